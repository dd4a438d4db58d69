"""Evaluate a (pruned, token-reduced) Mamba model: `python run.py method=ours ratio=0.3` (see conf/config.yaml)."""
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from ssmcompress.config import ConfigError, register_resolvers
from ssmcompress.models import ModelSourceError

register_resolvers()


@hydra.main(version_base="1.3", config_path="src/ssmcompress/conf", config_name="config")
def main(cfg: DictConfig):
    from ssmcompress import runner

    try:
        return runner.run(cfg)
    except (ConfigError, ModelSourceError) as error:
        print(f"error: {error}", file=sys.stderr)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # a sweep goes on with its other runs; Hydra reports the failure at its end (rerun: it resumes)
        sys.exit(2)


if __name__ == "__main__":
    main()
