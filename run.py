"""Evaluate a (pruned, token-reduced) Mamba model: `python run.py method=ours ratio=0.3` (configs: src/ssmcompress/conf).
The same job is the console script `ssmcompress-run` of an installed package."""
from ssmcompress.cli import run_main

if __name__ == "__main__":
    run_main()
