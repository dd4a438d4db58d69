#!/bin/bash
# Accuracy sweep of the bundled models on a GPU: +experiment=main (every method x 10/20/30 % of the
# FLOPs) on the offline suite, one process per model x method running side by side (accuracy does not depend on
# timing, so sharing the GPU is fine; efficiency.sh measures alone). fp32 by default, as the CPU runs, so the two
# devices' scores can be compared record by record (experiments/gpu/compare_devices.py); FLOPs and timings are
# taken at the CPU runs' shape (1 x 128), since parallel processes make timings meaningless anyway.
#   bash experiments/gpu/accuracy.sh            # wheels as in experiments/gpu/efficiency.sh
# EXTRA: more overrides (benchmark.limit=8). Results: $OUT/records.jsonl (every finished job) and $OUT/accuracy.log (each process's last lines).
set -u
PYTHON=${PYTHON:-python3}
OUT=${OUT:-$PWD/outputs/gpu-accuracy}
WORK=${WORK:-/tmp/gpu-accuracy}
mkdir -p "$OUT" "$WORK"
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false \
  WANDB_MODE=disabled HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
for model in ${MODELS:-mamba2-tiny mamba-tiny}; do
  for method in ${METHODS:-dense random tome pumer evit official ours}; do
    timeout "${TIMEOUT:-420}" "$PYTHON" run.py -m +experiment=main model="$model" method="$method" \
      ratio="${RATIOS:-0.1,0.2,0.3}" model.device="${DEVICE:-cuda}" model.dtype="${DTYPE:-float32}" logger=none \
      results_dir="$WORK/$model-$method" tag=gpu-main hydra.sweep.dir="$WORK/multirun/$model-$method" \
      benchmark.measure.shape.cuda.batch_size=1 benchmark.measure.shape.cuda.length=128 ${EXTRA:-} \
      > "$WORK/$model-$method.log" 2>&1 &
  done
done
wait
cat "$WORK"/*/records.jsonl > "$OUT/records.jsonl" 2>/dev/null
for log in "$WORK"/*.log; do echo "== $log"; grep -E "Error|Traceback|average|appended" "$log" | tail -n 8; done \
  > "$OUT/accuracy.log"
echo "$(wc -l < "$OUT/records.jsonl") records"
