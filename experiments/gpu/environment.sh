# Sourced by the GPU scripts: the carried wheels (`.whl`, see efficiency.sh) installed where the packages are missing,
# this checkout's src/ first on the path, unbuffered output, W&B offline. Sets PYTHON (default python3).
PYTHON=${PYTHON:-python3}
if ls .whl/*.whl > /dev/null 2>&1 && ! "$PYTHON" -c "import importlib.util as u, sys; sys.exit(not all(map(u.find_spec, ['hydra', 'fvcore', 'mamba_ssm'])))"; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=offline
