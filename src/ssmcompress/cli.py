"""The main job's command line: `ssmcompress-run` = `python run.py` (Hydra's command line: overrides, -m, --help).

The other console scripts are `ssmcompress-tables` (`ssmcompress.tables:cli`, = make tables) and
`ssmcompress-lm-eval` (`ssmcompress.lmeval:main`, lm-eval's command line with our model registered)."""
from __future__ import annotations

import logging
import re
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from ssmcompress.config import CONF_DIR, available
from ssmcompress.errors import ConfigError

GROUPS = ("model", "method", "benchmark", "pruner", "logger", "experiment")
OVERRIDE = re.compile(r"^\+{0,2}(?:override\s+)?/?(" + "|".join(GROUPS) + r")=(.*)$")


def unknown_options(argv: list[str]) -> list[str]:
    """Command-line choices of our config groups that do not exist (`method=unknwn`, `-m method=ours,nope`): one
    line each, before Hydra composes (its own message would be a different format and exit code)."""
    errors = []
    for arg in argv:
        match = OVERRIDE.match(arg)
        if not match or "(" in match.group(2) or "$" in match.group(2):  # sweep functions, interpolations: Hydra's
            continue
        group, values = match.groups()
        for value in (v.strip() for v in values.split(",")):
            if value and value not in ("null", "none") and not (CONF_DIR / group / f"{value}.yaml").is_file():
                errors.append(f"unknown {group} {value!r}: choose one of {', '.join(available(group))}")
    return errors


class ConsoleFormatter(logging.Formatter):
    """INFO as plain text (the summary table), other levels prefixed with their name: `warning: ...`."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        return message if record.levelno == logging.INFO else f"{record.levelname.lower()}: {message}"


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig):
    # imported here, not at the top: torch and the model stack (seconds) load after the command line's own checks
    from ssmcompress import runner

    try:
        return runner.run(cfg)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # a sweep goes on with its other runs; Hydra reports the failure at its end (rerun: it resumes)
        sys.exit(2)


def run_main() -> None:
    """`ssmcompress-run [overrides]` = `python run.py [overrides]` (Hydra's command line: -m for sweeps, --help)."""
    errors = unknown_options(sys.argv[1:])
    if errors:
        print(f"error: {errors[0]}", file=sys.stderr)
        sys.exit(2)
    main()
