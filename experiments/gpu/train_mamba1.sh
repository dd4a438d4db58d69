#!/bin/bash
# Retrain the bundled Mamba-1 (mamba-tiny) on a GPU through the Triton selective scan, in one call:
# chain "staged" follows mamba2-tiny's three-stage recipe (docs/suite.md, "Bundled tiny models"), chain "adaptive" one
# adaptive-curriculum run of the same total time; both run side by side (one tiny model leaves the GPU mostly idle).
# MINUTES is each stage's budget (the adaptive chain gets 3 x MINUTES), MODEL the model config (mamba-tiny; the
# bundled mamba3-tiny is this script's adaptive chain with MODEL=mamba3-tiny). Carry: .whl, data/cache.
# Results: $OUT/<chain>.tar.gz (model in hub format + train_log.jsonl) and $OUT/train_<chain>.log.
#   MINUTES=2.5 bash experiments/gpu/train_mamba1.sh
#   MODEL=mamba3-tiny MINUTES=2.2 bash experiments/gpu/train_mamba1.sh
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
W=/tmp/work M=${MINUTES:-2.5} MODEL=${MODEL:-mamba-tiny}
train() {  # out minutes extra...
  local out=$1 minutes=$2; shift 2
  # the hard timeout leaves room for the first step's kernel autotuning (Mamba-3's Triton kernels: minutes)
  timeout $(python3 -c "print(int($minutes * 60 + 240))") python3 -m ssmcompress.train --model $MODEL --out $W/$out \
    --tokenizer src/ssmcompress/assets/models/mamba2-tiny --batch-size 128 --workers 4 --save-every 100 \
    --steps 20000 --minutes $minutes "$@"
  test -f $W/$out/pytorch_model.bin || python3 -m ssmcompress.train --model $MODEL --out $W/$out --export-only
}
(
  train s1 $M
  train s2 $M --init $W/s1 --adaptive 0.9 --text-share 0.3 --answer-weight 3 --lr 2e-3 --warmup 100
  train staged $M --init $W/s2 --adaptive 0.9 --level 0.4 --text-share 0.25 --answer-weight 5 --lr 2e-3 --warmup 50
) > $OUT/train_staged.log 2>&1 &
train adaptive $(python3 -c "print(3 * $M)") --adaptive 0.9 --answer-weight 3 > $OUT/train_adaptive.log 2>&1 &
wait
for chain in staged adaptive; do
  tar czf $OUT/$chain.tar.gz --exclude=train_state.pt -C $W $chain
  echo "== $chain"; grep -ho '.* s/step.*\|"step": [0-9]*.*acc[^}]*' $OUT/train_$chain.log | tail -n 4
done
