#!/bin/bash
# Where token reduction pays and where it does not, on one GPU: every Mamba and Mamba-2 size from 130m up, batch 1
# and 8, prompts 2048 and 8192, EViT and ours at 10-30 % beside dense and the ceiling (+experiment=efficiency_sizes),
# each forward timed as CUDA graph replays (benchmark.measure.capture), after a check that the replays compute what
# the eager forwards compute (experiments/gpu/check_capture.py, which also times eager against replayed).
#   bash experiments/gpu/sizes.sh        # wheels as in experiments/gpu/efficiency.sh
# STAGES ("check sizes"; "chunk": schedule=chunk, whole SSD chunks or multiples of 16 tokens, CHUNK_MODELS at
# CHUNK_SHAPES), SHAPES ("1x2048 8x2048 1x8192 8x8192"), MODELS, METHODS (evit,ours), RATIOS (0.1,0.2,0.3),
# SHAPE_TIMEOUT (s per shape) choose a part, for machines that stop a command at 10 minutes; finished jobs are
# skipped, so the same command resumes. Records: $OUT/sizes/records.jsonl (tag gpu-efficiency), $OUT/check_capture.jsonl.
set -u
OUT=${OUT:-$PWD/outputs/sizes}
mkdir -p "$OUT"
. "$(dirname "$0")/environment.sh"
STAGES=" ${STAGES:-check sizes} "
if [[ $STAGES == *" check "* ]]; then
  timeout "${CHECK_TIMEOUT:-180}" "$PYTHON" experiments/gpu/check_capture.py "$OUT/check_capture.jsonl" \
    "${CHECK_MODELS:-mamba-130m,mamba2-130m,granite-4.0-h-1b}" ours,evit 1 2048 > "$OUT/check_capture.log" 2>&1
  echo "capture check: exit $?"; grep -E "^\{|Error" "$OUT/check_capture.log" | cut -c1-400
fi
if [[ $STAGES == *" sizes "* ]]; then
  for s in ${SHAPES:-1x2048 8x2048 1x8192 8x8192}; do
    sweep sizes gpu-efficiency "${SHAPE_TIMEOUT:-300}" +experiment=efficiency_sizes method="${METHODS:-evit,ours}" \
      ratio="${RATIOS:-0.1,0.2,0.3}" ${MODELS:+model=$MODELS} $(shape ${s/x/ })
  done
fi
if [[ $STAGES == *" chunk "* ]]; then  # counts in whole SSD chunks / multiples of 16 tokens: aligned lengths
  for s in ${CHUNK_SHAPES:-1x2048 8x2048}; do
    sweep sizes gpu-efficiency "${CHUNK_TIMEOUT:-200}" +experiment=efficiency_sizes schedule=chunk \
      method="${METHODS:-evit,ours}" ratio="${RATIOS:-0.1,0.2,0.3}" \
      model="${CHUNK_MODELS:-mamba-130m,mamba-2.8b,mamba2-130m,mamba2-2.7b}" $(shape ${s/x/ })
  done
fi
"$PYTHON" experiments/gpu/summary.py "$OUT/sizes/records.jsonl"
find "$OUT" -name .claims -type d -prune -exec rm -rf {} +
