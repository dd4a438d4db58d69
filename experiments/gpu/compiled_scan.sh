#!/bin/bash
# The Mamba-1 scan's anchor, on one GPU in one call: mamba-ssm's compiled `selective_scan_cuda` built for this GPU
# (in the background, from mamba-ssm's sdist), mamba-ssm's own scan tests run against our Triton scan meanwhile (in
# SHARDS processes; the failed cases then on the compiled kernel too), the two scans timed at mamba-2.8b's shapes
# (experiments/gpu/compiled_scan.py), and the whole mamba-2.8b, dense and reduced (EViT and ours at 10 and 30 %, CUDA
# graph replays), on each scan in turn: batch 8 x 2048 and 1 x 8192.
#   pip download --no-deps --no-binary :all: -d .whl mamba-ssm==2.3.2.post1     # the sdist, beside the wheels
#   # tests/ops/test_selective_scan.py of state-spaces/mamba (the sdist does not ship it) saved as .whl/test_selective_scan.py
#   bash experiments/gpu/compiled_scan.sh               # wheels as in experiments/gpu/efficiency.sh
# Files in $OUT: compiled_scan.json (kernels), scan_tests.json (ours) and scan_tests_compiled.json (mamba-ssm's kernel
# on the cases ours failed), model_cuda.jsonl and model_triton.jsonl (records of the whole model; each record's
# efficiency.scan_kernel names the scan), logs.tgz. SDIST, TESTS, BUILD, MAX_JOBS, SHARDS, TESTS_SKIP (cases a cut
# run already did), TESTS_TIMEOUT, MODEL_TIMEOUT (s per scan and shape), SCANS, SHAPES, TIME (0: no kernel timing), EXTRA_CHECK (a command run
# while it builds) choose a part; BUDGET (s, default 570): every step after the tests fits in it, and the files are
# packed before it ends (for a machine that stops a command at 10 minutes).
set -u
OUT=${OUT:-$PWD/outputs/compiled_scan}
mkdir -p "$OUT"
. "$(dirname "$0")/environment.sh"
SDIST=${SDIST:-.whl/mamba_ssm-2.3.2.post1.tar.gz}
TESTS=${TESTS:-.whl/test_selective_scan.py}
BUILD=${BUILD:-/tmp/selective_scan_build}
SHARDS=${SHARDS:-4}
DEADLINE=$((SECONDS + ${BUDGET:-570}))
left() { local s=$((DEADLINE - SECONDS - 20)); ((s > ${1:-10000})) && s=$1; echo $((s > 0 ? s : 1)); }
MAX_JOBS=${MAX_JOBS:-12} nice -n 10 "$PYTHON" experiments/gpu/compiled_scan.py build "$SDIST" "$BUILD" > "$OUT/build.log" 2>&1 &
build=$!
# what times nothing runs while it builds: mamba-ssm's scan tests on our scan, and EXTRA_CHECK
tests=()
for ((k = 0; k < SHARDS; k++)); do
  timeout "${TESTS_TIMEOUT:-300}" "$PYTHON" experiments/gpu/compiled_scan.py tests "$TESTS" "$OUT/scan_tests_$k.json" \
    --shard "$k/$SHARDS" --skip "${TESTS_SKIP:-0}" > "$OUT/scan_tests_$k.log" 2>&1 &
  tests+=($!)
done
[[ -n ${EXTRA_CHECK:-} ]] && { bash -c "$EXTRA_CHECK" > "$OUT/extra_check.log" 2>&1; echo "extra check: exit $?"; }
wait "${tests[@]}"
"$PYTHON" experiments/gpu/compiled_scan.py merge "$OUT/scan_tests.json" "$OUT"/scan_tests_[0-9]*.json
( sleep "$(left)"; kill $build 2> /dev/null ) & watchdog=$!
wait $build; echo "build: exit $?"; kill $watchdog 2> /dev/null; grep -E "error|built" "$OUT/build.log" | tail -n 5 | cut -c1-300
if "$PYTHON" -c "import json, sys; sys.exit(not json.load(open('$OUT/scan_tests.json'))['failed'])"; then
  timeout "$(left 60)" "$PYTHON" experiments/gpu/compiled_scan.py tests "$TESTS" "$OUT/scan_tests_compiled.json" --compiled "$BUILD" \
    --only "$OUT/scan_tests.json" > "$OUT/scan_tests_compiled.log" 2>&1
  echo "the failed cases on mamba-ssm's compiled kernel: exit $?"; tail -n 1 "$OUT/scan_tests_compiled.log" | cut -c1-300
fi
if [[ ${TIME:-1} == 1 ]]; then
  timeout "$(left 90)" "$PYTHON" experiments/gpu/compiled_scan.py time "$BUILD" "$OUT/compiled_scan.json" > "$OUT/time.log" 2>&1
  echo "timing: exit $?"; grep -E "^\{|Error" "$OUT/time.log" | cut -c1-300
fi
# the whole model on each scan: the same jobs, one store per scan (the run key does not name the scan), a shape at a time
for s in ${SHAPES:-8x2048 1x8192}; do
  for scan in ${SCANS:-cuda triton}; do
    PYTHONPATH=$BUILD:$PYTHONPATH SSMCOMPRESS_MAMBA1_SCAN=$scan sweep "model_$scan" gpu-efficiency "$(left "${MODEL_TIMEOUT:-150}")" \
      +experiment=efficiency_sizes model=mamba-2.8b method=evit,ours ratio=0.1,0.3 $(shape ${s/x/ })
    cp "$OUT/model_$scan/records.jsonl" "$OUT/model_$scan.jsonl" 2> /dev/null
  done
done
"$PYTHON" experiments/gpu/summary.py "$OUT"/model_*.jsonl
# few files come back from a machine: the logs and the shards' reports in one archive
(cd "$OUT" && tar czf logs.tgz ./*.log scan_tests_[0-9]*.json && rm -rf ./*.log scan_tests_[0-9]*.json model_cuda model_triton)
