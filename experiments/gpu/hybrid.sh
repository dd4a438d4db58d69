#!/bin/bash
# What token reduction buys on an SSM-attention hybrid, on one GPU in one call (random weights, bf16), at the size of
# a public checkpoint (granite-4.0-h-1b: transformers' GraniteMoeHybrid, 36 Mamba-2 and 4 attention layers):
# 1. our Triton causal conv against torch's conv1d + SiLU (experiments/gpu/check_causal_conv.py), the transformers
#    host's kernels against transformers' own pure-torch code, and where a forward spends its time
#    (experiments/gpu/check_transformers_kernels.py);
# 2. benchmark=efficiency: dense, each method and the ceiling at one schedule, interleaved, batch 8 x 2048;
#    SHAPE_METHODS (every method but official) also at batch 1 x 2048, 1 x 8192 and 8 x 8192; eager launches as
#    lm-eval runs them (CAPTURE=true: CUDA graph replays, the efficiency_graph tables); `profile`: where ours' time goes
#    (experiments/gpu/profile_reduction.py, torch.profiler over a dense and a reduced forward);
# 3. the hosts side by side: mamba2-2.7b on mamba-ssm and the same architecture in transformers (mamba2-2.7b-hf);
# 4. benchmark=generation, the paper's protocol (batch 16, 2048 + 100 tokens): prefill, decode, KV cache, bound;
#    transformers' decoding step is compiled for its static cache (CUDA graphs), once per variant in the warm-up.
#   bash experiments/gpu/hybrid.sh                      # wheels as in experiments/gpu/efficiency.sh, plus
#   pip download --no-deps -d .whl transformers==5.23.0  (the version the transformers host is tested with)
# Records: $OUT/eff/records.jsonl, $OUT/gen/records.jsonl (tags gpu-efficiency, gpu-gen: the committed tables'),
# $OUT/check/*, $OUT/check_causal_conv.jsonl, $OUT/profile.txt; logs beside them. METHODS, SHAPE_METHODS, RATIO, MODEL override the defaults below;
# STAGES (default "check eff profile hosts gen") runs some of the steps, e.g. in calls of a machine that stops a
# command at 10 minutes (STAGES=check, STAGES="eff profile", then STAGES="hosts gen"). Each step's first forward compiles and autotunes mamba-ssm's Triton
# kernels (about a minute per dtype and shape family, then cached on disk), so a step's timeout must allow for it.
set -u
OUT=${OUT:-$PWD/outputs/hybrid}
mkdir -p "$OUT"
. "$(dirname "$0")/environment.sh"
MODEL=${MODEL:-granite-4.0-h-1b}
METHODS=${METHODS:-random,tome,pumer,evit,official,ours}
SHAPE_METHODS=${SHAPE_METHODS:-random,tome,pumer,evit,ours}
RATIO=${RATIO:-0.3}
STAGES=" ${STAGES:-check eff profile hosts gen} "
eff=(benchmark=efficiency benchmark.measure.fvcore=false benchmark.measure.capture="${CAPTURE:-false}")
if [[ $STAGES == *" check "* ]]; then
  timeout -s INT "${CONV_TIMEOUT:-120}" "$PYTHON" experiments/gpu/check_causal_conv.py "$OUT/check_causal_conv.jsonl" > "$OUT/check_causal_conv.log" 2>&1
  echo "causal conv check: exit $?"; cut -c1-400 "$OUT/check_causal_conv.log"
  timeout "${CHECK_TIMEOUT:-240}" "$PYTHON" experiments/gpu/check_transformers_kernels.py "$OUT/check" \
    > "$OUT/check.log" 2>&1; echo "check: exit $?"; grep -E "^\{|Error" "$OUT/check.log" | cut -c1-600
fi
if [[ $STAGES == *" eff "* ]]; then
  sweep eff gpu-efficiency "${EFF_TIMEOUT:-300}" "${eff[@]}" model="$MODEL" method="$METHODS" ratio="$RATIO" $(shape 8 2048)
  for s in ${SHAPES:-1x2048 1x8192 8x8192}; do
    sweep eff gpu-efficiency "${SHAPE_TIMEOUT:-200}" "${eff[@]}" model="$MODEL" method="$SHAPE_METHODS" ratio="$RATIO" $(shape ${s/x/ })
  done
fi
if [[ $STAGES == *" profile "* ]]; then
  timeout "${PROFILE_TIMEOUT:-150}" "$PYTHON" experiments/gpu/profile_reduction.py "$OUT/profile.txt" "$MODEL" ours 8 2048 \
    > "$OUT/profile.log" 2>&1; echo "profile: exit $?"; grep -E "^==|reduction's|Error" "$OUT/profile.log"
fi
if [[ $STAGES == *" hosts "* ]]; then
  sweep eff gpu-efficiency 240 "${eff[@]}" model=mamba2-2.7b,mamba2-2.7b-hf method=ours ratio="$RATIO" $(shape 8 2048)
fi
if [[ $STAGES == *" gen "* ]]; then
  sweep gen gpu-gen "${GEN_TIMEOUT:-330}" benchmark=generation model="$MODEL" method="$METHODS" ratio="$RATIO" $(shape 16 2048) \
    benchmark.measure.repeats="${GEN_REPEATS:-2}"
fi

"$PYTHON" experiments/gpu/summary.py "$OUT/eff/records.jsonl" "$OUT/gen/records.jsonl"
find "$OUT" -name .claims -type d -prune -exec rm -rf {} +
