#!/usr/bin/env bash
# One prepared GPU session: vqldm's side-by-side benchmark, then the microtubule quality runs.
# Usage: bash benchmarks/gpu_run.sh OUTDIR [smoke]
# Needs vqldm importable (pip install -e . or PYTHONPATH=src). With .bench/anchor_gpu.py present (a copy of
# the shared reference loop) and ANCHOR=1 it also runs that. Each step has its own time limit.
set -u
OUTDIR=${1:?usage: gpu_run.sh OUTDIR [smoke]}
MODE=${2:-full}
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1
SMOKE=""; DEV=cuda; SHAPE="96 96 48"; NTRAIN=256; NVAL=32; CFG=configs/microtubules.yaml; E1=40; E2=100
if [ "$MODE" = smoke ]; then SMOKE="--smoke"; DEV=cpu; SHAPE="32 32 16"; NTRAIN=8; NVAL=4; E1=1; E2=1; fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null; python3 -c "import torch;print(torch.__version__)"; } > "$OUTDIR/device.txt" 2>&1
if [ "${ANCHOR:-0}" = 1 ] && [ -f .bench/anchor_gpu.py ]; then
  timeout 90 python3 .bench/anchor_gpu.py $SMOKE --only reference_fp16 > "$OUTDIR/anchor.jsonl" 2> "$OUTDIR/anchor.err"
fi
timeout 200 python3 -m vqldm benchmark $SMOKE --device $DEV > "$OUTDIR/bench.jsonl" 2> "$OUTDIR/bench.err"
echo "benchmark rc=$?"; cat "$OUTDIR/bench.jsonl"
# quality: the microtubule config on synthetic 96x96x48 volumes, fixed epoch budgets
Q=/tmp/vqldm_q; rm -rf $Q
SET="--set data.train_data_dir=$Q/data/train --set data.val_data_dir=$Q/data/val --set device.use_cuda=$([ $DEV = cuda ] && echo true || echo false)"
SET1="$SET --set vqvae.checkpoints.output_dir=$Q/vq --set vqvae.logging.log_dir=$Q/vq_logs --set vqvae.training.n_epochs=$E1"
SET2="$SET --set diffusion.checkpoints.vqvae_path=$Q/vq/best_model.pt --set diffusion.checkpoints.output_dir=$Q/dm --set diffusion.logging.log_dir=$Q/dm_logs --set diffusion.training.n_epochs=$E2"
python3 -m vqldm -q synth --out $Q/data --num-train $NTRAIN --num-val $NVAL --shape $SHAPE --seed 0 > /dev/null
( time timeout 120 python3 -m vqldm -q train-vqvae -c $CFG $SET1 ) > "$OUTDIR/stage1.txt" 2>&1
echo "stage1 rc=$?"; tail -8 "$OUTDIR/stage1.txt"
timeout 40 python3 -m vqldm -q evaluate -c $CFG $SET1 --out $Q/eval1 > /dev/null 2>> "$OUTDIR/stage1.txt" && cp $Q/eval1/metrics.json "$OUTDIR/stage1_metrics.json" && cp $Q/eval1/reconstruction.png "$OUTDIR/stage1_reconstruction.png"
cat "$OUTDIR/stage1_metrics.json" 2>/dev/null
( time timeout 150 python3 -m vqldm -q train-diffusion -c $CFG $SET2 ) > "$OUTDIR/stage2.txt" 2>&1
echo "stage2 rc=$?"; tail -8 "$OUTDIR/stage2.txt"
for snap in on off; do
  timeout 60 python3 -m vqldm -q sample -c $CFG $SET2 -n 32 --batch-size 32 --snap $snap --out $Q/samples_$snap > /dev/null 2>> "$OUTDIR/stage2.txt" \
  && timeout 60 python3 -m vqldm -q evaluate -c $CFG $SET1 --out $Q/eval_$snap --samples $Q/samples_$snap > /dev/null 2>> "$OUTDIR/stage2.txt" \
  && cp $Q/eval_$snap/metrics.json "$OUTDIR/gen_metrics_snap_$snap.json" && cp $Q/samples_$snap/preview.png "$OUTDIR/preview_snap_$snap.png"
  echo "snap $snap rc=$?"
done
ls -la "$OUTDIR"
