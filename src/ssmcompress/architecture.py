"""Architecture facts of a mamba-ssm model from its config dict alone, without building it.

The budget, the FLOPs model and the config checks need the same facts `models.model_info` reads off a built model
(d_inner, heads, chunk size, padded vocabulary). Building even a meta-device model needs mamba-ssm, whose import
(Triton, transformers) takes seconds; these are the constructors' own formulas, so bad input is refused before any
heavy import. A test holds this equal to `models.model_info` on built models of both generations.
"""
from __future__ import annotations

import math

# mamba-ssm 2.3.2's defaults: MambaConfig (models/config_mamba.py), Mamba2.__init__ and Mamba.__init__
CONFIG_DEFAULTS = dict(d_model=2560, n_layer=64, vocab_size=50277, pad_vocab_size_multiple=8)
MAMBA2_DEFAULTS = dict(d_state=128, d_conv=4, expand=2, headdim=64, d_ssm=None, ngroups=1, chunk_size=256)
MAMBA1_DEFAULTS = dict(d_state=16, d_conv=4, expand=2, dt_rank="auto")


def generation(config: dict) -> int:
    """2 for a Mamba-2 config (`ssm_cfg.layer: Mamba2`), 1 otherwise (mamba-ssm's default layer is Mamba1)."""
    return 2 if (config.get("ssm_cfg") or {}).get("layer", "Mamba1") == "Mamba2" else 1


def padded_vocab(vocab_size: int, multiple: int) -> int:
    return vocab_size + (-vocab_size) % multiple


def info_from_config(config: dict) -> dict:
    """`models.model_info` without the parameter count: generation, widths, state size, conv width, vocabulary
    (padded as MambaLMHeadModel pads it), and per generation the heads / chunk size or the dt rank."""
    top = {**CONFIG_DEFAULTS, **{k: v for k, v in config.items() if v is not None}}
    ssm = dict(config.get("ssm_cfg") or {})
    d_model = int(top["d_model"])
    info = dict(generation=generation(config), d_model=d_model, n_layer=int(top["n_layer"]),
                vocab_size=padded_vocab(int(top["vocab_size"]), int(top["pad_vocab_size_multiple"])))
    if info["generation"] == 2:
        s = {**MAMBA2_DEFAULTS, **ssm}
        d_inner = int(s["expand"] * d_model)
        d_ssm = d_inner if s["d_ssm"] is None else int(s["d_ssm"])
        info.update(d_inner=d_inner, d_state=int(s["d_state"]), d_conv=int(s["d_conv"]),
                    nheads=d_ssm // int(s["headdim"]), headdim=int(s["headdim"]), ngroups=int(s["ngroups"]),
                    chunk_size=int(s["chunk_size"]))
    else:
        s = {**MAMBA1_DEFAULTS, **ssm}
        dt_rank = math.ceil(d_model / 16) if s["dt_rank"] == "auto" else int(s["dt_rank"])
        info.update(d_inner=int(s["expand"] * d_model), d_state=int(s["d_state"]), d_conv=int(s["d_conv"]),
                    dt_rank=dt_rank)
    return info
