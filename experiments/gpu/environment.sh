# Sourced by the GPU scripts: the carried wheels (`.whl`, see efficiency.sh) installed where the packages are missing,
# this checkout's src/ first on the path, unbuffered output, W&B offline. Sets PYTHON (default python3).
PYTHON=${PYTHON:-python3}
if ls .whl/*.whl > /dev/null 2>&1 && ! "$PYTHON" -c "import importlib.util as u, sys; sys.exit(not all(map(u.find_spec, ['hydra', 'fvcore', 'mamba_ssm'])))"; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=offline

# sweep STORE TAG TIMEOUT OVERRIDES...: one Hydra multirun of random-weight models (DEVICE, default cuda; DTYPE,
# default bfloat16; jobs one after another on the basic launcher, so nothing shares the GPU while measuring), records
# in $OUT/STORE/records.jsonl, its log in $OUT/STORE.log; finished jobs are skipped, so a sweep cut by its timeout
# resumes where it stopped
sweep() {
  local name=$1 tag=$2 limit=$3; shift 3
  timeout "$limit" "$PYTHON" run.py -m model.random_init=true model.device="${DEVICE:-cuda}" model.dtype="${DTYPE:-bfloat16}" \
    skip_existing=true logger=none "$@" results_dir="$OUT/$name" tag="$tag" hydra.sweep.dir="${WORK:-/tmp/gpu}/$name" \
    >> "$OUT/$name.log" 2>&1
  echo "$name $*: exit $?"; grep -E "Error|Traceback" "$OUT/$name.log" | tail -n 5
}
# shape BATCH LENGTH: the overrides of the measured input on DEVICE
shape() { echo benchmark.measure.shape."${DEVICE:-cuda}".batch_size="$1" benchmark.measure.shape."${DEVICE:-cuda}".length="$2"; }
