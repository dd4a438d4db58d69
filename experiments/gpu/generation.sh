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
common=(model.random_init=true model.device="$DEVICE" model.dtype="${DTYPE:-bfloat16}" skip_existing=true logger=none)
sweep() {  # name timeout overrides...
  local name=$1 limit=$2; shift 2
  timeout "$limit" "$PYTHON" run.py -m "${common[@]}" "$@" results_dir="$OUT/$name" tag="gpu-$name" \
    hydra.sweep.dir="${WORK:-/tmp/generation}/$name" > "$OUT/$name.log" 2>&1
  echo "$name: exit $?"; grep -E "Error|Traceback" "$OUT/$name.log" | tail -n 5
}
for model in ${GEN_MODELS:-mamba2-2.7b mamba2-1.3b}; do
  [ "$model" = none ] || sweep gen "${GEN_TIMEOUT:-200}" benchmark=generation model="$model" \
    method="${GEN_METHODS:-random,tome,pumer,evit,official,ours}" ratio="${GEN_RATIOS:-0.1,0.2,0.3}" \
    benchmark.measure.shape."$DEVICE".batch_size="${GEN_BATCH:-16}" benchmark.measure.shape."$DEVICE".length="${LENGTH:-2048}"
done
for model in ${MEM_MODELS:-mamba2-2.7b mamba2-1.3b}; do
  [ "$model" = none ] || sweep mem "${MEM_TIMEOUT:-120}" benchmark=efficiency model="$model" \
    method="${MEM_METHODS:-random,tome,pumer,evit,official,ours}" ratio="${MEM_RATIOS:-0.1,0.2,0.3}" benchmark.measure.fvcore=false \
    benchmark.measure.ceiling=false benchmark.measure.capture=false benchmark.measure.warmup=1 benchmark.measure.repeats=1 \
    benchmark.measure.mixer_rows="${MIXER_ROWS:-16}" benchmark.measure.reduction_rows="${REDUCTION_ROWS:-16}" \
    benchmark.measure.shape."$DEVICE".batch_size="${MEM_BATCH:-96}" benchmark.measure.shape."$DEVICE".length="${LENGTH:-2048}"
done
"$PYTHON" - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
for name in ("gen", "mem"):
    store = out / name / "records.jsonl"
    for line in (store.read_text().splitlines() if store.exists() else []):
        r = json.loads(line)
        g, e = r.get("generation") or {}, r.get("efficiency") or {}
        if g:
            print(f"gen {r['model']:<12}{r['method']:<6}{r['ratio'] or 0:>5} speedup {g.get('speedup', 1):.3f} prefill "
                  f"{g.get('prefill_speedup', 1):.3f} bound {g.get('bound', 0):.3f} of bound {g.get('of_bound', 0):.3f} "
                  f"decode/token {g['dense_decode_ms_per_token']:.2f}/{g.get('reduced_decode_ms_per_token', 0):.2f} ms")
        if e:
            print(f"mem {r['model']:<12}{r['method']:<6}{r['ratio'] or 0:>5} peak {e['dense_peak_mib']:.0f} -> "
                  f"{e.get('reduced_peak_mib', 0):.0f} MiB (saving {100 * e.get('peak_memory_saving', 0):.1f} %); "
                  f"mixers / reduction {e.get('mixer_rows')} / {e.get('reduction_rows')} rows: "
                  f"{e.get('sliced_dense_peak_mib', 0):.0f} -> {e.get('sliced_reduced_peak_mib', 0):.0f} MiB "
                  f"(saving {100 * e.get('sliced_peak_memory_saving', 0):.1f} %)")
PY
# the run-key claims (tracking.claim) are done with: keep $OUT to the records and logs
find "$OUT" -name .claims -type d -prune -exec rm -rf {} +
