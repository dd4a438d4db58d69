#!/bin/bash
# The paper's efficiency protocol on one GPU in one call: generation throughput (benchmark=generation:
# batch 16, prompts of 2048 tokens, 100 new tokens; dense, reduced and the ceiling's prefill in one process) and peak
# memory of a forward at batch 96 x 2048 (benchmark=efficiency; also with the mixers and the reduction layers' methods
# run MIXER_ROWS=16 / REDUCTION_ROWS=16 rows at a time), random weights, bf16.
#   bash experiments/gpu/generation.sh
#   GEN_MODELS=mamba2-2.7b GEN_METHODS=ours,evit GEN_RATIOS=0.3 MEM_MODELS=none bash experiments/gpu/generation.sh
# Records: $OUT/gen/records.jsonl, $OUT/mem/records.jsonl (one per job, written as each finishes); logs beside them.
# Wheels: as experiments/gpu/efficiency.sh (carry `.whl`).
set -u
OUT=${OUT:-$PWD/outputs/generation}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
. "$(dirname "$0")/environment.sh"
for model in ${GEN_MODELS:-mamba2-2.7b mamba2-1.3b}; do
  [ "$model" = none ] || sweep gen gpu-gen "${GEN_TIMEOUT:-200}" benchmark=generation model="$model" \
    method="${GEN_METHODS:-random,tome,pumer,evit,official,ours}" ratio="${GEN_RATIOS:-0.1,0.2,0.3}" \
    $(shape "${GEN_BATCH:-16}" "${LENGTH:-2048}")
done
for model in ${MEM_MODELS:-mamba2-2.7b mamba2-1.3b}; do
  [ "$model" = none ] || sweep mem gpu-mem "${MEM_TIMEOUT:-120}" benchmark=efficiency model="$model" \
    method="${MEM_METHODS:-random,tome,pumer,evit,official,ours}" ratio="${MEM_RATIOS:-0.1,0.2,0.3}" benchmark.measure.fvcore=false \
    benchmark.measure.ceiling=false benchmark.measure.capture=false benchmark.measure.warmup=1 benchmark.measure.repeats=1 \
    benchmark.measure.mixer_rows="${MIXER_ROWS:-16}" benchmark.measure.reduction_rows="${REDUCTION_ROWS:-16}" \
    $(shape "${MEM_BATCH:-96}" "${LENGTH:-2048}")
done
"$PYTHON" experiments/gpu/summary.py "$OUT/gen/records.jsonl" "$OUT/mem/records.jsonl"
# the run-key claims (tracking.claim) are done with: keep $OUT to the records and logs
find "$OUT" -name .claims -type d -prune -exec rm -rf {} +
