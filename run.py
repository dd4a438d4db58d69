"""Evaluate a (pruned, token-reduced) Mamba model: `python run.py method=ours ratio=0.3` (see conf/config.yaml)."""
import sys

import hydra
from omegaconf import DictConfig

from ssmcompress.config import ConfigError, register_resolvers
from ssmcompress.models import ModelSourceError

register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig):
    from ssmcompress import runner

    try:
        return runner.run(cfg)
    except (ConfigError, ModelSourceError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
