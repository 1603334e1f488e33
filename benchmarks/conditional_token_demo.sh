#!/bin/bash
# Class-conditional token prior (docs/conditional.md, "Token prior"): on the stage 1 and the three density
# levels of a benchmarks/conditional_demo.sh run, the demo preset's token prior trained with
# data.labels_file, 64 samples per level at guidance 1 and 3, benchmarks/condition_accuracy.py, and
# vqldm evaluate per class at each W.
# usage: bash benchmarks/conditional_token_demo.sh DEMO_OUT OUT_DIR [--set KEY=VALUE ...]
#        (DEMO_OUT: conditional_demo.sh's folder; extra options go to train-prior; N=64 samples per class;
#        2-core CPU: about 17 min)
set -euo pipefail
DEMO=$(cd "${1:?usage: bash benchmarks/conditional_token_demo.sh DEMO_OUT OUT_DIR}" && pwd)
OUT=${2:?usage: bash benchmarks/conditional_token_demo.sh DEMO_OUT OUT_DIR}
shift 2
N=${N:-64}
HERE=$(cd "$(dirname "$0")" && pwd)
CFG=$(python -c "import vqldm, pathlib; print(pathlib.Path(vqldm.__file__).parent / 'configs' / 'demo.yaml')")
mkdir -p "$OUT" && cd "$OUT"
V="python -m vqldm --quiet"
L=$DEMO/lev
VQ=$DEMO/out/vq/best_model.pt
S="--set seed=1 --set data.train_data_dir=$L/train --set data.val_data_dir=$L/val --set data.labels_file=$L/labels.csv
   --set device.use_cuda=false --set prior.checkpoints.output_dir=prior --set prior.logging.log_dir=prior_logs
   --set prior.checkpoints.vqvae_path=$VQ"
T0=$(date +%s)
$V train-prior -c "$CFG" $S "$@"
T1=$(date +%s)
for W in 1 3; do for c in level0 level1 level2; do
  $V sample -c "$CFG" $S --prior transformer -n "$N" --batch-size 32 --class $c --guidance $W --out s_w${W}_$c
done; done
T2=$(date +%s)
python "$HERE/condition_accuracy.py" --real "$L/train" --labels "$L/labels.csv" --samples s_w* --out accuracy.json
for W in 1 3; do
  $V evaluate -c "$CFG" $S --vqvae-checkpoint "$VQ" --samples s_w${W}_level0 --samples s_w${W}_level1 \
     --samples s_w${W}_level2 --out eval_cls_w$W
done
echo "times: train-prior $((T1-T0)) s, sampling $((T2-T1)) s"
