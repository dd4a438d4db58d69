#!/bin/bash
# Token reduction at the kernels' speed, on one GPU in one call: the fused kernels against their
# references at a real model's widths (check_reduction_kernels.py), then the efficiency benchmark with the `ceiling`
# beside every method (benchmark.measure.ceiling) under both schedules (smooth, chunk).
#   bash experiments/gpu/reduction_speed.sh                      # mamba2-2.7b, batch 8: docs/gpu.md's table
#   KERNELS=0 MODELS=mamba2-1.3b RATIOS=0.3 BATCH=16 bash experiments/gpu/reduction_speed.sh
# Records: $OUT/eff/results/records.jsonl (one per job, written as each finishes), logs beside them.
# Wheels: as experiments/gpu/efficiency.sh (carry `.whl`).
set -u
OUT=${OUT:-$PWD/outputs/reduction_speed}
mkdir -p "$OUT"
. "$(dirname "$0")/environment.sh"
if [ "${KERNELS:-1}" = 1 ]; then
  timeout "${KERNEL_TIMEOUT:-150}" "$PYTHON" experiments/gpu/check_reduction_kernels.py "$OUT/kernels" \
    "${KERNEL_MODEL:-mamba2-2.7b}" "${BATCH:-8}" "${LENGTH:-2048}" "${KERNEL_METHODS:-evit,ours,tome,pumer,official,random}" \
    > "$OUT/kernels.log" 2>&1
  echo "kernels: exit $?"; tail -n 5 "$OUT/kernels.log"
fi
OUT="$OUT/eff" MODELS="${MODELS:-mamba2-2.7b}" METHODS="${METHODS:-evit,random,ours,tome,pumer,official}" \
  RATIOS="${RATIOS:-0.1,0.2,0.3}" SCHEDULE="${SCHEDULE:-smooth,chunk}" BATCH="${BATCH:-8}" \
  TIMEOUT="${TIMEOUT:-420}" WORK="${WORK:-/tmp/reduction_speed}" bash experiments/gpu/efficiency.sh
