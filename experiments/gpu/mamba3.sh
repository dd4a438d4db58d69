#!/bin/bash
# Mamba-3 on one GPU in one call (random weights, bf16): mamba-ssm's kernels against the pure-torch layers
# (experiments/gpu/check_mamba3.py: SISO, also with a token reduction's factors on the angle steps, and MIMO where
# TileLang is installed), then benchmark=efficiency at mamba2-1.3b's widths (model=mamba3-1.3b; MODELS adds
# mamba3-mimo-1.3b: mamba-ssm's TileLang kernel where installed, else the pure-torch layer, which its records say),
# dense, METHODS and the ceiling interleaved, batch 8 x 2048; and benchmark=generation (batch 16, 2048 + 100 tokens;
# decoding on mamba-ssm's CuTe step where nvidia-cutlass-dsl is installed, else the pure-torch step: decode_kernel).
# The first forward of each shape compiles and autotunes mamba-ssm's Mamba-3 kernels (minutes): the timeouts allow
# for it, and finished jobs are skipped when the same command runs again.
#   bash experiments/gpu/mamba3.sh                      # wheels as in experiments/gpu/efficiency.sh
#   STAGES=eff MODELS=mamba3-1.3b,mamba3-mimo-1.3b METHODS=ours bash experiments/gpu/mamba3.sh
# Records: $OUT/eff/records.jsonl (tag gpu-efficiency), $OUT/gen/records.jsonl (gpu-gen), $OUT/check_mamba3.json.
# CPU dry run at the bundled size: PYTHON=.venv/bin/python DEVICE=cpu DTYPE=float32 MODELS=mamba3-tiny STAGES="eff gen"
set -u
OUT=${OUT:-$PWD/outputs/mamba3}
mkdir -p "$OUT"
. "$(dirname "$0")/environment.sh"
STAGES=" ${STAGES:-check eff gen} "
MODELS=${MODELS:-mamba3-1.3b}
if [[ $STAGES == *" check "* ]]; then
  timeout "${CHECK_TIMEOUT:-240}" "$PYTHON" experiments/gpu/check_mamba3.py "$OUT/check_mamba3.json" > "$OUT/check_mamba3.log" 2>&1
  echo "check: exit $?"; grep -E "p95_relative|skipped|Error" "$OUT/check_mamba3.log" | cut -c1-200
fi
if [[ $STAGES == *" eff "* ]]; then
  sweep eff gpu-efficiency "${EFF_TIMEOUT:-330}" benchmark=efficiency benchmark.measure.fvcore=false model="$MODELS" \
    method="${METHODS:-evit,tome,ours}" ratio="${RATIO:-0.3}" $(shape 8 2048)
fi
if [[ $STAGES == *" gen "* ]]; then
  sweep gen gpu-gen "${GEN_TIMEOUT:-330}" benchmark=generation model="$MODELS" method="${GEN_METHODS:-ours}" \
    ratio="${RATIO:-0.3}" $(shape 16 2048) benchmark.measure.repeats="${GEN_REPEATS:-2}"
fi
"$PYTHON" experiments/gpu/summary.py "$OUT/eff/records.jsonl" "$OUT/gen/records.jsonl"
find "$OUT" -name .claims -type d -prune -exec rm -rf {} +
