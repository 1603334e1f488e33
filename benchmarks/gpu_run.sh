#!/usr/bin/env bash
# One prepared GPU session for issue 7 (speed), each part under its own time limit:
#   train    vqldm benchmark --sweep, training metrics: reference vs vqldm, plus each speed switch
#   sample   the same for sampling (its own process: a slow compile in one cannot cost the other)
#   tests    the CUDA-graph tests (tests/test_cuda_graphs.py; skipped on a CPU)
#   quality  the same trained demo checkpoints sample 64 volumes on the GPU with the fast paths (bf16,
#            CUDA graphs, channels_last_3d) and without (fp32 eager); `vqldm evaluate` scores each
#            against the same real volumes (needs DEMO=folder of a finished `vqldm demo`)
#   profile  where the step time goes (benchmarks/profile_steps.py)
#   anchor   with .bench/anchor_gpu.py present (a copy of the shared reference loop): its reference rows
# Usage: [PARTS="train sample ..."] [BENCH_ARGS=--no-compile] bash benchmarks/gpu_run.sh OUTDIR
# (vqldm importable: pip install -e . or PYTHONPATH=src). At most 8 files land in OUTDIR.
set -u
OUTDIR=${1:?usage: gpu_run.sh OUTDIR}
PARTS=${PARTS:-train sample tests quality profile anchor}
BENCH_ARGS=${BENCH_ARGS:-}
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1
ERR="$OUTDIR/errors.log"
has() { case " $PARTS " in *" $1 "*) return 0;; esac; return 1; }
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
  python3 -c "import torch, monai; print('torch', torch.__version__, 'monai', monai.__version__)"; } > "$OUTDIR/device.txt" 2>&1
cat "$OUTDIR/device.txt"
T0=$SECONDS
if has train; then
  timeout "${TRAIN_S:-200}" python3 -m vqldm benchmark --sweep $BENCH_ARGS \
    --only stage1_train_volumes_per_s,stage2_train_latents_per_s >> "$OUTDIR/bench.jsonl" 2>> "$ERR"
  echo "benchmark train rc=$? ($((SECONDS - T0)) s)"; T0=$SECONDS
fi
if has sample; then
  timeout "${SAMPLE_S:-120}" python3 -m vqldm benchmark --sweep $BENCH_ARGS --only sample_volumes_per_s \
    >> "$OUTDIR/bench.jsonl" 2>> "$ERR"
  echo "benchmark sample rc=$? ($((SECONDS - T0)) s)"; T0=$SECONDS
fi
if has tests; then
  timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_graphs.py > "$OUTDIR/cuda_tests.txt" 2>&1
  echo "cuda tests rc=$? ($((SECONDS - T0)) s)"; tail -3 "$OUTDIR/cuda_tests.txt"; T0=$SECONDS
fi
if has quality && [ -n "${DEMO:-}" ] && [ -d "$DEMO" ]; then
  Q=/tmp/vqldm_fastpaths; rm -rf $Q
  SET="--set device.use_cuda=true --set data.train_data_dir=$DEMO/data/train --set data.val_data_dir=$DEMO/data/val"
  CK="--diffusion-checkpoint $DEMO/diffusion_checkpoints/best_model.pt --vqvae-checkpoint $DEMO/vqvae_checkpoints/best_model.pt"
  PLAIN="--set device.mixed_precision=false --set device.cuda_graphs=false --set device.channels_last=false"
  for mode in fast plain; do
    EXTRA=""; [ $mode = plain ] && EXTRA="$PLAIN"
    timeout 60 python3 -m vqldm -q sample -c "$DEMO/config.yaml" $SET $EXTRA $CK -n 64 --batch-size 64 --seed 0 \
      --out $Q/samples_$mode > /dev/null 2>> "$ERR" \
    && timeout 60 python3 -m vqldm -q evaluate -c "$DEMO/config.yaml" $SET $EXTRA \
      --vqvae-checkpoint $DEMO/vqvae_checkpoints/best_model.pt --samples $Q/samples_$mode --out $Q/eval_$mode \
      > /dev/null 2>> "$ERR" \
    && python3 -c "import json,sys; m=json.load(open(sys.argv[1])); m['sampling_run']=json.load(open(sys.argv[2])); json.dump(m,open(sys.argv[3],'w'),indent=1)" \
      $Q/eval_$mode/metrics.json $Q/samples_$mode/samples.json "$OUTDIR/quality_$mode.json"
    echo "quality $mode rc=$?"
  done
  echo "quality ($((SECONDS - T0)) s)"; T0=$SECONDS
fi
if has profile; then
  timeout "${PROFILE_S:-90}" python3 benchmarks/profile_steps.py --graphs > "$OUTDIR/profile.txt" 2>&1
  echo "profile rc=$? ($((SECONDS - T0)) s)"; T0=$SECONDS
fi
if has anchor && [ -f .bench/anchor_gpu.py ]; then
  timeout "${ANCHOR_S:-45}" python3 .bench/anchor_gpu.py --only reference_fp16 > "$OUTDIR/anchor.jsonl" 2>> "$ERR"
  echo "anchor rc=$? ($((SECONDS - T0)) s)"
fi
echo "---- bench"; grep -v '"what": "device"' "$OUTDIR/bench.jsonl" 2>/dev/null | cut -c1-260
echo "---- profile"; grep "==" "$OUTDIR/profile.txt" 2>/dev/null
echo "---- anchor"; cut -c1-200 "$OUTDIR/anchor.jsonl" 2>/dev/null
