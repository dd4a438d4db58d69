"""A data-parallel process whose rank 1 fails during evaluation: what a launch leaves behind when one of its
processes dies (tests/evaluation/test_data_parallel.py). `failing_rank.py run <overrides>` runs the main job,
`failing_rank.py lmeval <lm-eval's options>` lm-eval's command line with our model."""
import os
import sys

from ssmcompress import cli, lmeval
from ssmcompress.evaluation import lm_backend

if os.environ.get("RANK") == "1":
    def fail(self, *args, **kwargs):
        raise RuntimeError("rank 1 fails here")

    lm_backend.Reduction._model_call = fail

entry = sys.argv.pop(1)
lmeval.main() if entry == "lmeval" else cli.run_main()
