#!/usr/bin/env bash
# One prepared GPU session: reference loops, vqldm's benchmark, and the microtubule quality run.
# Usage: bash benchmarks/gpu_run.sh OUTDIR [smoke]
# Expects vqldm importable (pip install -e . or PYTHONPATH=src) and, for the anchor, .bench/anchor_gpu.py
# (a copy of the shared reference loop). Each step has its own time limit so one failure loses no other.
set -u
OUTDIR=${1:?usage: gpu_run.sh OUTDIR [smoke]}
MODE=${2:-full}
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1
SMOKE=""; PRESET=microtubules; DEV=cuda
if [ "$MODE" = smoke ]; then SMOKE="--smoke"; PRESET=demo; DEV=cpu; fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null; python3 -c "import torch;print(torch.__version__)"; } > "$OUTDIR/device.txt" 2>&1
if [ -f .bench/anchor_gpu.py ]; then
  timeout 150 python3 .bench/anchor_gpu.py $SMOKE --only reference_fp16 > "$OUTDIR/anchor.jsonl" 2> "$OUTDIR/anchor.err"
  echo "anchor rc=$?"
fi
timeout 330 python3 -m vqldm benchmark $SMOKE --device $DEV > "$OUTDIR/bench.jsonl" 2> "$OUTDIR/bench.err"
echo "benchmark rc=$?"
cat "$OUTDIR/bench.jsonl"
MT=/tmp/vqldm_quality
timeout 330 python3 -m vqldm -q demo --preset $PRESET --out $MT --device $DEV > "$OUTDIR/quality.txt" 2> "$OUTDIR/quality.err"
echo "quality rc=$?"
cat "$OUTDIR/quality.txt"
if [ -f $MT/diffusion_checkpoints/best_model.pt ]; then
  timeout 60 python3 -m vqldm -q sample -c $MT/config.yaml -n 32 --snap off --out $MT/samples_nosnap --seed 0 --batch-size 32 \
    && timeout 60 python3 -m vqldm -q evaluate -c $MT/config.yaml --out $MT/eval_nosnap --samples $MT/samples_nosnap > /dev/null 2>> "$OUTDIR/quality.err"
  echo "nosnap rc=$?"
  python3 - "$MT" "$OUTDIR" <<'PY'
import json, shutil, sys
from pathlib import Path
mt, out = Path(sys.argv[1]), Path(sys.argv[2])
res = {}
for name, p in (("snap", mt / "evaluation/metrics.json"), ("nosnap", mt / "eval_nosnap/metrics.json")):
    if p.exists():
        res[name] = json.loads(p.read_text())
(out / "quality_metrics.json").write_text(json.dumps(res))
for src, dst in ((mt / "samples/preview.png", "samples_preview.png"), (mt / "evaluation/reconstruction.png", "reconstruction.png"),
                 (mt / "evaluation/histograms.png", "histograms.png"), (mt / "evaluation/real_vs_generated.png", "real_vs_generated.png")):
    if src.exists():
        shutil.copy(src, out / dst)
PY
fi
ls -la "$OUTDIR"
