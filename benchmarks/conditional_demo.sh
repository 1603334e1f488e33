#!/bin/bash
# Class-conditional demo (docs/conditional.md): three synthetic density levels, the demo preset with
# data.labels_file, 64 samples per level at guidance 1 and 3, then benchmarks/condition_accuracy.py.
# usage: bash benchmarks/conditional_demo.sh OUT_DIR      (2-core CPU: about 30 min)
set -euo pipefail
OUT=${1:?usage: bash benchmarks/conditional_demo.sh OUT_DIR}
HERE=$(cd "$(dirname "$0")" && pwd)
CFG=$(python -c "import vqldm, pathlib; print(pathlib.Path(vqldm.__file__).parent / 'configs' / 'demo.yaml')")
mkdir -p "$OUT" && cd "$OUT"
V="vqldm --quiet"
$V synth --out lev --num-train 96 --num-val 24 --shape 48 48 24 --seed 0 --vary density --levels 3
S="--set seed=1 --set data.train_data_dir=lev/train --set data.val_data_dir=lev/val --set data.labels_file=lev/labels.csv
   --set device.use_cuda=false --set vqvae.checkpoints.output_dir=out/vq --set vqvae.logging.log_dir=out/vq_logs
   --set diffusion.checkpoints.output_dir=out/diff --set diffusion.logging.log_dir=out/diff_logs
   --set diffusion.checkpoints.vqvae_path=out/vq/best_model.pt"
$V train-vqvae -c "$CFG" $S
$V train-diffusion -c "$CFG" $S
for W in 1 3; do for c in level0 level1 level2; do
  $V sample -c "$CFG" $S -n 64 --batch-size 32 --class $c --guidance $W --out s_w${W}_$c
done; done
python "$HERE/condition_accuracy.py" --real lev/train --labels lev/labels.csv --samples s_w* --out accuracy.json
