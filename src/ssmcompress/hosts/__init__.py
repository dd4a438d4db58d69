"""Hosts: one file per model library, all the package knows about models built with it.

    mamba_ssm     mamba-ssm's MambaLMHeadModel: Mamba-1, Mamba-2, and its hybrids with attention (`attn_layer_idx`)
    transformers  transformers' causal LMs: Mamba, Mamba2 and FalconMamba, the hybrids of Mamba and attention layers
                  (Bamba, GraniteMoeHybrid, NemotronH, FalconH1, Jamba), and any other causal LM for dense evaluation
                  and weight pruning

Every host module has the same functions, in two halves (ToMe's one `patch/<library>.py` per library, with the
loading beside it, so that a new library is one file):
- loading: `check_config(cfg)`, `load_config(source)`, `build_model`, `load_model`, `load_tokenizer`, `save_model`,
  `info_from_config(config)` and `model_info(model)` (the architecture description, `ssmcompress.architecture`),
  `check_reduction(info, layers)` (what token reduction cannot do on this model, as a ConfigError);
- reduction, what the reducer (`reduction.patch`) and the metrics ask: `logits(model, input_ids)`, one forward;
  `layers(model)` and `lm_head(model)`; `importance_site(model,
  index)`, the module whose input is the signal the paper scores (the SSM output before `out_proj`; an attention
  layer's output before `o_proj`); `fused_flags(model, index)`, flags of fused kernels that would fold that module
  away; `attach_streams(model, index, reduce)`, hooks through which layer `index`'s output passes as the paper's two
  streams, `reduce(hidden, residual) -> (hidden, residual)`; `attach_context(model, first, state)`, hooks that give
  every layer after the first reduction layer the positions, masks and caches of the kept tokens; `prefill(model,
  begin, settle)`, hooks on the forwards that start a generation; `prefill_cache(model, input_ids)`, such a forward
  (last-position logits and the cache), `kv_cache_bytes(model, cache)` what the cache's attention layers hold; `generate(...)`, the library's own decoding.

A model config's `family` names its host as the records store it (`mamba`: mamba-ssm, `hf`: transformers); without
one (`model=local`) the checkpoint's config.json decides: a `model_type` is transformers' mark, mamba-ssm has none.
"""
from __future__ import annotations

from types import ModuleType

from ssmcompress import models
from ssmcompress.errors import ConfigError
from ssmcompress.hosts import mamba_ssm, transformers

HOSTS = {"mamba": mamba_ssm, "hf": transformers}


def detect(config: dict) -> str:
    """The family of a checkpoint's config.json: `hf` where it names a transformers `model_type`, else `mamba`."""
    return "hf" if "model_type" in config else "mamba"


def name_of(model_cfg) -> str:
    """The family of a model config (`cfg.model`, a DictConfig or dict): its `family`, else read off the source's
    config.json (or the config of a random init)."""
    name = model_cfg.get("family")
    if name is None:
        config, path = model_cfg.get("config"), model_cfg.get("path")
        if not config:
            if path is None:
                raise ConfigError("model.path must be set (a checkpoint directory or hub name) to read its family")
            config = models.source_config(str(path))
        name = detect(dict(config))
    if name not in HOSTS:
        raise ConfigError(f"unknown model family {name!r}: use one of {', '.join(HOSTS)} (mamba: mamba-ssm, hf: "
                          f"transformers), or leave it out to read it from the checkpoint's config.json")
    return name


def of(model_cfg) -> ModuleType:
    """The host of a model config."""
    return HOSTS[name_of(model_cfg)]


def of_model(model) -> ModuleType:
    """The host of a built model."""
    return transformers if transformers.is_model(model) else mamba_ssm


def of_info(info: dict) -> ModuleType:
    # mamba-ssm's descriptions name their host (`host`), transformers' their family (`family`)
    return HOSTS[info.get("host") or info.get("family") or "mamba"]
