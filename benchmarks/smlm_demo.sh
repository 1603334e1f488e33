#!/bin/bash
# SMLM end to end on the demo preset (docs/smlm.md, "An example"): synthetic localisation tables ->
# vqldm voxelize -> both stages -> vqldm sample --format points -> vqldm evaluate --points and --samples.
# usage: bash benchmarks/smlm_demo.sh OUT_DIR      (2-core CPU: about 17 min)
set -euo pipefail
OUT=${1:?usage: bash benchmarks/smlm_demo.sh OUT_DIR}
CFG=$(python -c "import vqldm, pathlib; print(pathlib.Path(vqldm.__file__).parent / 'configs' / 'demo.yaml')")
mkdir -p "$OUT" && cd "$OUT"
V="vqldm --quiet"
$V synth --out syn --num-train 80 --num-val 0 --shape 48 48 24 --seed 0 --locs
$V voxelize --input syn/locs/train --out data --fov 8000 8000 300 --shape 48 48 24 --val-fraction 0.2 --seed 0
S="--set data.train_data_dir=data/train --set data.val_data_dir=data/val --set device.use_cuda=false
   --set vqvae.checkpoints.output_dir=out/vq --set vqvae.logging.log_dir=out/vq_logs
   --set diffusion.checkpoints.output_dir=out/diff --set diffusion.logging.log_dir=out/diff_logs
   --set diffusion.checkpoints.vqvae_path=out/vq/best_model.pt"
$V train-vqvae -c "$CFG" $S
$V train-diffusion -c "$CFG" $S
$V sample -c "$CFG" $S -n 32 --batch-size 16 --format points --out samples
$V evaluate -c "$CFG" $S --samples samples --points samples --out eval
echo "eval/points_report.md, eval/report.md, eval/points.png"
