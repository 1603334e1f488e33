#!/usr/bin/env bash
# One prepared GPU session for issue 13 (realistic samples): the microtubule config at its real size,
# 96 x 96 x 48, end to end with `vqldm demo --preset microtubules` (synthesise 256 + 32 volumes, stage 1,
# stage 2, sample 64, evaluate against the held-out volumes and the real-vs-real floor).
# Usage: [PRESET=microtubules] [LIMIT_S=540] bash benchmarks/gpu_microtubules.sh OUTDIR
# (vqldm importable: pip install -e . or PYTHONPATH=src). At most 8 files land in OUTDIR: device.txt,
# run.log (the demo's last lines), timings.json, metrics.json, report.md, stages.png, samples.json.
# PRESET=demo runs the CPU-sized demo the same way (a check of this script without a GPU).
set -u
OUTDIR=${1:?usage: gpu_microtubules.sh OUTDIR}
PRESET=${PRESET:-microtubules}
WORK=${WORK:-$(mktemp -d /tmp/vqldm_${PRESET}_XXXX)}
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
  python3 -c "import torch, monai; print('torch', torch.__version__, 'monai', monai.__version__)"; } > "$OUTDIR/device.txt" 2>&1
T0=$SECONDS
timeout "${LIMIT_S:-540}" python3 -m vqldm demo --preset "$PRESET" --out "$WORK/run" > "$WORK/run.log" 2>&1
echo "vqldm demo --preset $PRESET: rc=$? after $((SECONDS - T0)) s (124: stopped by LIMIT_S)" | tee -a "$OUTDIR/device.txt"
tr '\r' '\n' < "$WORK/run.log" | grep -v '^ *$' | tail -n 80 > "$OUTDIR/run.log"
for f in timings.json evaluation/metrics.json evaluation/report.md evaluation/stages.png samples/samples.json; do
  if [ -f "$WORK/run/$f" ]; then cp "$WORK/run/$f" "$OUTDIR/"; else echo "missing: $f" >> "$OUTDIR/device.txt"; fi
done
