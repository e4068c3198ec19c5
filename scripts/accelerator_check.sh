#!/usr/bin/env bash
# The prepared accelerator check (docs/PERFORMANCE.md, "Reported columns"):
# the models suite (FCN, CNN, PTB LSTM-1024 at T=5; float32, and the FCN /
# CNN in bfloat16), data parallelism and the pipelines over the devices
# present, and one full-size Table 1 row; one JSON + markdown summary.
#
#   scripts/accelerator_check.sh [OUT_DIR]
#
# OUT_DIR: default $OUT (the device machine's output folder), else
# ./accelerator_check. DNI_CHECK_SMALL=1: tiny sizes over two fake CPU
# devices (end to end on a CPU in well under a minute; what the test runs).
# DNI_CHECK_PROFILE_STEPS=N: also a jax.profiler trace of N steps of every
# fused row (OUT_DIR/profile/).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-accelerator_check}}"
args=(--suite=accelerator_check "--out_dir=$out"
      "--profile_steps=${DNI_CHECK_PROFILE_STEPS:-0}")
if [[ "${DNI_CHECK_SMALL:-0}" == 1 ]]; then
  args+=(--small --num_devices=2)
fi
exec "${PYTHON:-python}" scripts/benchmark.py "${args[@]}"
