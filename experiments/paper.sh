#!/usr/bin/env bash
# Every sweep behind the paper's tables, one after the other, then the tables:
#   bash experiments/paper.sh                           # bundled tiny models, offline suite; then the tables
#   bash experiments/paper.sh hydra/launcher=slurm hydra.launcher.partition=gpu   # each run a SLURM job
# Extra arguments are Hydra overrides given to every sweep. Interrupted? Run the same command again: finished runs
# are skipped (skip_existing: the results store already holds their resolved config's key).
# Hub models: run the sweeps one by one with their overrides (see the header of each experiments/*.yaml).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
for experiment in main ablation_importance ablation_location ablation_design ablation_share efficiency; do
  echo "== +experiment=$experiment"
  "$PY" run.py -m "+experiment=$experiment" "$@"
done
results=results  # the tables read the store the sweeps wrote (results_dir=... among the overrides)
for arg in "$@"; do case "$arg" in results_dir=*) results="${arg#results_dir=}" ;; esac; done
"$PY" -m ssmcompress.tables --results "$results"
