#!/usr/bin/env bash
# Table 1, MNIST FCN rows: {3,4,5,6} layers x {no_bprop, bprop, dni, cdni},
# all under the same reduced schedule. Usage:
#   scripts/reproduce_table1_fcn.sh MNIST_DIR OUT_DIR [NUM_STEPS] [LEARNING_RATE]
# The learning rate drops x0.1 at 60% and 80% of NUM_STEPS, the shape of the
# paper's 500k-step schedule (x0.1 at 300k and 400k). Each run is resumable:
# rerunning the script skips finished runs and resumes interrupted ones.
set -euo pipefail
data_dir=${1:?MNIST_DIR}; out=${2:?OUT_DIR}; steps=${3:-3000}; lr=${4:-3e-4}
here=$(cd "$(dirname "$0")" && pwd)
b1=$((steps * 6 / 10)); b2=$((steps * 8 / 10))
for layers in 3 4 5 6; do
  for method in no_bprop bprop dni cdni; do
    python "$here/train_ff.py" --dataset=mnist --data_dir="$data_dir" \
      --num_layers="$layers" --method="$method" --num_steps="$steps" \
      --learning_rate="$lr" --lr_boundaries="$b1,$b2" \
      --eval_every=$((steps / 10)) --log_every=$((steps / 10)) \
      --checkpoint_every="$steps" --seed=0 \
      --workdir="$out/fcn${layers}_${method}"
  done
done
python "$here/report.py" --paper_table=mnist_fcn "$out"/fcn*_*
