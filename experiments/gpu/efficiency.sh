#!/bin/bash
# Efficiency benchmark (benchmark=efficiency) on a GPU in one call: FLOPs, latency (CUDA events,
# median of repeats), tokens/s and peak memory (torch.cuda, reset per measurement) of the dense and the reduced
# model, measured in the same process, at full size with random weights.
#   bash experiments/gpu/efficiency.sh                                  # mamba2-2.7b, ours, ratios 0.1 0.2 0.3
#   MODELS=mamba2-1.3b,mamba2-2.7b METHODS=ours,evit,pumer RATIOS=0.3 BATCH=8 LENGTH=2048 bash experiments/gpu/efficiency.sh
# DTYPE (bfloat16), FVCORE (false: FLOPs by the analytic ruler only, which the tests hold to fvcore within 2 %),
# SCHEDULE (smooth | chunk: counts in whole SSD chunks, multiples of 16 on Mamba-1), WARMUP (2), REPEATS (5),
# TIMEOUT (540 s for the whole sweep; every finished job's record is already written).
# Results: $OUT/results/records.jsonl (one record per job) and $OUT/efficiency.log; a table is printed at the end.
# The GPU machine reaches no package index: carry `.whl` holding these wheels (built once where PyPI is reachable)
#   pip wheel --no-deps -w .whl hydra-core==1.3.8 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3 \
#       fvcore==0.1.5.post20221221 iopath==0.1.10 yacs portalocker tabulate termcolor einops==0.8.2 tqdm
#   pip download --no-deps -d .whl transformers==5.23.0     # the transformers host's tested version (hybrid.sh)
#   pip download --no-deps -d .whl hydra-joblib-launcher==1.2.0     # hydra/launcher=gpus, a job per GPU of a machine
#   MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE pip wheel --no-deps --no-build-isolation -w .whl mamba-ssm==2.3.2.post1
# CPU check at a tiny size (no wheels needed in the project's venv):
#   PYTHON=.venv/bin/python OUT=/tmp/eff MODELS=mamba2-tiny BATCH=1 LENGTH=64 DEVICE=cpu bash experiments/gpu/efficiency.sh
set -u
OUT=${OUT:-$PWD/outputs/efficiency}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
. "$(dirname "$0")/environment.sh"
"$PYTHON" -c "import torch; print(torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"

# one Hydra multirun: jobs run one after another (basic launcher), so nothing else shares the GPU while measuring
timeout "${TIMEOUT:-540}" "$PYTHON" run.py -m benchmark=efficiency model="${MODELS:-mamba2-2.7b}" \
  model.random_init=true model.device="$DEVICE" model.dtype="${DTYPE:-bfloat16}" method="${METHODS:-ours}" ratio="${RATIOS:-0.1,0.2,0.3}" schedule="${SCHEDULE:-smooth}" \
  benchmark.measure.shape."$DEVICE".batch_size="${BATCH:-8}" benchmark.measure.shape."$DEVICE".length="${LENGTH:-2048}" \
  benchmark.measure.warmup="${WARMUP:-2}" benchmark.measure.repeats="${REPEATS:-5}" \
  benchmark.measure.fvcore="${FVCORE:-false}" skip_existing=true \
  logger=none results_dir="$OUT/results" tag=gpu-efficiency hydra.sweep.dir="${WORK:-/tmp/efficiency}/multirun" \
  > "$OUT/efficiency.log" 2>&1
echo "exit $?"
grep -E "Error|Traceback|Killed" "$OUT/efficiency.log" | tail -n 20
"$PYTHON" - "$OUT/results/records.jsonl" <<'EOF'
import json, sys
from ssmcompress.records import unrepresentative_paths
print(f"{'model':<14}{'method':<10}{'batch':>6}{'ratio':>6}{'FLOPs ratio':>12}{'dense ms':>10}{'reduced ms':>11}"
      f"{'speedup':>8}{'ideal':>7}{'ceiling':>8}{'of ceil':>8}{'overhead':>9}{'dense MiB':>11}{'reduced MiB':>12}"
      f"{'act. saving':>12}")
for line in open(sys.argv[1]):
    r = json.loads(line)
    f, e = r.get("flops", {}), r.get("efficiency", {})
    ideal = 1 / (1 - f.get('achieved_ratio', 0))
    print(f"{r['model']:<14}{r['method']:<10}{e.get('batch_size', 0):>6}{r['ratio'] or 0:>6}"
          f"{f.get('achieved_ratio', 0):>12.4f}{e.get('dense_latency_ms', 0):>10.1f}{e.get('reduced_latency_ms', 0):>11.1f}"
          f"{e.get('speedup', 1):>8.3f}{ideal:>7.3f}{e.get('ceiling_speedup', 0):>8.3f}{100 * e.get('of_ceiling', 0):>7.1f}%"
          f"{100 * e.get('reduction_overhead', 0):>8.2f}%"
          f"{e.get('dense_peak_mib', 0):>11.0f}{e.get('reduced_peak_mib', 0):>12.0f}"
          f"{e.get('activation_memory_saving', 0):>12.3f}")
    for name, path in unrepresentative_paths(e).items():  # a pure-torch path on the GPU: not the kernels' latency
        print(f"  {name}: {path}")
EOF
# the run-key claims (tracking.claim) are done with: keep $OUT to the records and logs
find "$OUT" -name .claims -type d -prune -exec rm -rf {} +
