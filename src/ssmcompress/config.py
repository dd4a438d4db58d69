"""Hydra/OmegaConf glue: path resolvers, the run key, and validation of a composed config before any work."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

PACKAGE = Path(__file__).resolve().parent
REPO = PACKAGE.parents[1]  # the checkout, when the package runs from one (src layout)
CONF_DIR = PACKAGE / "conf"  # shipped with the package: Hydra composes from it in a checkout and in a wheel
EXPERIMENTS = CONF_DIR / "experiment"  # the sweeps: `+experiment=<name>`
ASSETS = PACKAGE / "assets"
# sections that say where and how a run is logged, not what it computes: excluded from the run key
VOLATILE = ("logger", "hydra", "results_dir", "skip_existing", "tag")


class ConfigError(ValueError):
    """A config the run cannot use; raised before any model is loaded, with a one-line message."""


def register_resolvers() -> None:
    """`${asset:models/mamba2-tiny}` (bundled files) and `${repo:results}` (paths inside the repository)."""
    if not OmegaConf.has_resolver("asset"):
        OmegaConf.register_new_resolver("asset", lambda sub="": str(ASSETS / sub))
    if not OmegaConf.has_resolver("repo"):
        OmegaConf.register_new_resolver("repo", lambda sub="": str(REPO / sub))


register_resolvers()


def to_dict(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


def run_key(cfg: DictConfig | dict) -> str:
    """A stable hash of everything that determines a run's numbers (resume and de-duplication use it)."""
    resolved = to_dict(cfg) if isinstance(cfg, DictConfig) else dict(cfg)
    for name in VOLATILE:
        resolved.pop(name, None)
    if resolved.get("method", {}).get("name") == "dense":
        resolved["ratio"], resolved["layers"] = None, None  # dense ignores them: one dense record, not one per ratio
    if resolved.get("pruner", {}).get("name") == "none":
        resolved["sparsity"] = None
    if isinstance(resolved.get("pruner"), dict):  # where the pruned weights are written does not change the numbers
        resolved["pruner"] = {k: v for k, v in resolved["pruner"].items() if k != "save_dir"}
    text = json.dumps(resolved, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def available(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def validate(cfg: DictConfig) -> None:
    """Reject unusable settings with a clear message before any work (model, benchmark, ratio, protocol)."""
    from ssmcompress import families, models

    for group in ("model", "method", "benchmark"):
        name = cfg.get(group, {}).get("name")
        if name is None:
            raise ConfigError(f"no {group} selected; choose one of: {', '.join(available(group))}")
    if cfg.protocol not in ("exact", "paper"):
        raise ConfigError(f"unknown protocol {cfg.protocol!r}: use exact or paper")
    if cfg.method.name != "dense":
        if cfg.ratio is None:
            raise ConfigError(f"method={cfg.method.name} needs ratio=<fraction of FLOPs removed>, e.g. ratio=0.3")
        if not (isinstance(cfg.ratio, (int, float)) and 0 < float(cfg.ratio) < 1):
            raise ConfigError(f"ratio must be a number with 0 < ratio < 1 (fraction of FLOPs removed), got {cfg.ratio!r}")
    device = models.resolve_device(cfg.model.device)
    models.resolve_dtype(cfg.model.dtype, device)
    # a local dir without config.json, an offline hub name, ... fail here, before any weights are read
    family = families.of(cfg.model)  # models (mamba-ssm) or hf_models (transformers)
    model_config = to_dict(cfg.model)["config"] if cfg.model.random_init else family.load_config(cfg.model.path)
    families.check_config(cfg)  # e.g. no token reduction on transformers models
    if cfg.method.name != "dense":
        from ssmcompress import reduction

        if hasattr(reduction, "check_config"):
            reduction.check_config(cfg, model_config)  # raises ConfigError
    if cfg.pruner.name != "none":
        from ssmcompress import pruning

        if hasattr(pruning, "check_config"):
            pruning.check_config(cfg, model_config)  # raises ConfigError
    if cfg.benchmark.kind == "lm_eval":
        include = cfg.benchmark.get("include_path")
        if include and not Path(include).is_dir():
            raise ConfigError(f"benchmark {cfg.benchmark.name}: task directory {include} does not exist")
        from ssmcompress.evaluation import harness

        harness.check_datasets(to_dict(cfg.benchmark))  # hub datasets reachable or cached, else ConfigError
