"""Model families: `mamba` (mamba-ssm models, models.py) and `hf` (transformers causal LMs, hf_models.py).

A model config's `family` key (default mamba) picks the module that loads, builds, saves and describes its models;
both modules have the same functions (check_config, load_config, build_model, load_model, load_tokenizer, save_model,
model_info).
"""
from __future__ import annotations

from types import ModuleType

from ssmcompress import hf_models, models
from ssmcompress.errors import ConfigError

FAMILIES = {"mamba": models, "hf": hf_models}


def name_of(model_cfg) -> str:
    name = model_cfg.get("family") or "mamba"
    if name not in FAMILIES:
        raise ConfigError(f"unknown model family {name!r}: use one of {', '.join(FAMILIES)}")
    return name


def of(model_cfg) -> ModuleType:
    """The module for a model config (`cfg.model`, a DictConfig or dict)."""
    return FAMILIES[name_of(model_cfg)]


def of_model(model) -> ModuleType:
    """The module for a built model."""
    return hf_models if hf_models.is_model(model) else models
