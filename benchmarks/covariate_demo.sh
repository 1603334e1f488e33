#!/bin/bash
# Covariate-conditional diffusion prior (docs/conditional.md, "Covariates"): on the stage 1 and the three
# density levels of a benchmarks/conditional_demo.sh run, the demo preset's stage 2 conditioned on the
# filament count alone (diffusion.covariates: [n_filaments]; the level labels are left out), 64 samples at
# n_filaments 5, 12 and 30 (the levels' centres) at guidance 1 and 3, at 8 and 20 (counts no training
# volume has) and unconditioned, then benchmarks/covariate_control.py.
# usage: bash benchmarks/covariate_demo.sh DEMO_OUT OUT_DIR   (2-core CPU, one thread: about 35 min)
set -euo pipefail
DEMO=$(cd "${1:?usage: bash benchmarks/covariate_demo.sh DEMO_OUT OUT_DIR}" && pwd)
OUT=${2:?usage: bash benchmarks/covariate_demo.sh DEMO_OUT OUT_DIR}
N=${N:-64}
HERE=$(cd "$(dirname "$0")" && pwd)
CFG=$(python -c "import vqldm, pathlib; print(pathlib.Path(vqldm.__file__).parent / 'configs' / 'demo.yaml')")
L=$DEMO/lev
head -1 "$L/labels.csv" | grep -q n_filaments || { echo "$L/labels.csv has no n_filaments column: rerun conditional_demo.sh"; exit 2; }
mkdir -p "$OUT" && cd "$OUT"
cut -d, -f1,3 "$L/labels.csv" > counts.csv  # file,n_filaments
V="python -m vqldm --quiet"
S="--set seed=1 --set data.train_data_dir=$L/train --set data.val_data_dir=$L/val --set data.labels_file=counts.csv
   --set diffusion.covariates=[n_filaments] --set device.use_cuda=false --set diffusion.checkpoints.output_dir=diff
   --set diffusion.logging.log_dir=diff_logs --set diffusion.checkpoints.vqvae_path=$DEMO/out/vq/best_model.pt"
$V train-diffusion -c "$CFG" $S
for W in 1 3; do for n in 5 12 30; do
  $V sample -c "$CFG" $S -n "$N" --batch-size 32 --cond n_filaments=$n --guidance $W --autoguidance 1 --out s_w${W}_n$n
done; done
for n in 8 20; do $V sample -c "$CFG" $S -n "$N" --batch-size 32 --cond n_filaments=$n --autoguidance 1 --out s_w1_n$n; done
$V sample -c "$CFG" $S -n "$N" --batch-size 32 --autoguidance 1 --out s_uncond
for W in 1 3; do
  python "$HERE/covariate_control.py" --real "$L/train" --val "$L/val" --labels "$L/labels.csv" --covariate n_filaments \
    --samples s_w${W}_n5 s_w${W}_n12 s_w${W}_n30 --out control_w$W.json --png control_w$W.png
done
python "$HERE/covariate_control.py" --real "$L/train" --labels "$L/labels.csv" --covariate n_filaments \
  --samples s_w1_n5 s_w1_n8 s_w1_n12 s_w1_n20 s_w1_n30 --out control_between.json
