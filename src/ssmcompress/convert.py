"""Convert mamba-ssm models to the equivalent transformers models, and mamba-ssm hybrids back.

mamba-ssm's `MambaLMHeadModel` (`ssmcompress.hosts.mamba_ssm`) becomes, by transformers' own conversion rules
(`src/transformers/models/mamba/convert_mamba_ssm_checkpoint_to_pytorch.py` and
`src/transformers/models/mamba2/convert_mamba2_ssm_checkpoint_to_pytorch.py`):
    Mamba-1 (`ssm_cfg.layer` Mamba1, the default)      -> MambaForCausalLM   (model_type mamba)
    Mamba-2 (`ssm_cfg.layer: Mamba2`)                   -> Mamba2ForCausalLM  (model_type mamba2)
    Mamba-2 + `MHA` layers at `attn_layer_idx`, no MLP  -> NemotronHForCausalLM (model_type nemotron_h, layers M / *)
and the hybrid converts back (`to_mamba_ssm`), so that a hybrid trained in either library runs on the other.

What transformers' scripts do, and what is done here beyond them:
- Weights: the SSM layers' parameters have the same names in both libraries; only the embedding is renamed
  (`backbone.embedding` -> `backbone.embeddings`, which transformers' own load hook also does). NemotronH keeps its
  layers under `model.` instead of `backbone.`, and splits MHA's fused `in_proj` (q, then k and v, as mamba-ssm's MHA
  splits it) into `q_proj`, `k_proj`, `v_proj`; MHA's `out_proj` is `o_proj`.
- Vocabulary: padded to `pad_vocab_size_multiple` as MambaLMHeadModel pads it (both scripts do the same); the way
  back keeps the padded size (pad_vocab_size_multiple 1): the unpadded size is not recorded in a transformers model.
- Config: the scripts leave d_state, headdim, ngroups, chunk_size (Mamba-2) and expand, dt_rank (Mamba-1) at the
  transformers defaults or at the released models' values; here every field is carried from `ssm_cfg`, and anything
  transformers' modules cannot compute (d_ssm, D_has_hdim, norm_before_gate, MLP layers, rotary or convolutional
  MHA, ...) is refused with a ValueError of one line instead of converting into a different model.
- dtypes: each tensor keeps its dtype (mamba-ssm keeps A_log and D in float32 in a half-precision model).
- NemotronH as transformers 5 has it: its mixer clamps dt below at `time_step_min` (mamba-ssm's dt_limit (0, inf)
  becomes DT_FLOOR; an upper dt_limit is refused), its attention has no biases (MHA layers with biases are refused),
  it does not tie lm_head to the embedding (both are written, equal) and it keeps the residual in the model's dtype
  (equal in float32; in half precision mamba-ssm's residual_in_fp32 is not reproduced).
Models are built through `ssmcompress.hosts.transformers.build_model` / `hosts.mamba_ssm.build_model` (their kernels
routed per device, so this runs on a CPU) and filled by a strict `load_state_dict`.

Command line: `python -m ssmcompress.convert SRC DST [--dtype float16|float32|bfloat16]` reads a mamba-ssm checkpoint
directory (config.json, pytorch_model.bin, tokenizer files) and writes a transformers one (`save_pretrained`).
"""
from __future__ import annotations

import argparse
import inspect
import math
import sys
from pathlib import Path

import torch

from ssmcompress.hosts import mamba_ssm as mamba_host
from ssmcompress.hosts import transformers as hf_host
from ssmcompress.models import source_config

# mamba-ssm's RMSNorm eps: create_block / MixerModel's norm_epsilon (MambaConfig has no field for it) and Mamba2's
# gated RMSNorm (a constant in Mamba2.__init__)
NORM_EPS = 1e-5
INF = float("inf")
# NemotronH's mixer clamps dt below at `time_step_min` (transformers 5: time_step_limit = (time_step_min, inf)),
# where mamba-ssm's default dt_limit (0, inf) clamps nothing, and its init takes log(time_step_min), so 0 cannot be
# written: the smallest normal float32 stands for 0 (softplus gives a smaller dt only below -87)
DT_FLOOR = torch.finfo(torch.float32).tiny
# the constructors' defaults (mamba-ssm 2.3.2: Mamba.__init__, Mamba2.__init__, MHA.__init__, MambaConfig)
TOP_DEFAULTS = dict(mamba_host.CONFIG_DEFAULTS, rms_norm=True, residual_in_fp32=True, tie_embeddings=True)
MAMBA1 = dict(mamba_host.MAMBA1_DEFAULTS, dt_min=0.001, dt_max=0.1, dt_init="random", dt_scale=1.0,
              dt_init_floor=1e-4, conv_bias=True, bias=False)
MAMBA2 = dict(mamba_host.MAMBA2_DEFAULTS, dt_min=0.001, dt_max=0.1, dt_init_floor=1e-4, dt_limit=(0.0, INF),
              bias=False, conv_bias=True, D_has_hdim=False, rmsnorm=True, norm_before_gate=False)
MHA = dict(mamba_host.MHA_DEFAULTS, qkv_proj_bias=True, out_proj_bias=True, softmax_scale=None, d_conv=0)
# ssm_cfg / attn_cfg keys that change nothing a converted model computes: initialisation, kernel choice
INIT_ONLY = {"layer", "conv_init", "A_init_range", "use_fast_path", "use_mem_eff_path", "rotary_emb_base",
             "rotary_emb_interleaved"}
# the layer kinds of NemotronH (transformers 5 spelling, then the older one) and its pattern letters
SSM_KINDS, ATTENTION_KINDS = ("linear_attention", "mamba"), ("full_attention", "attention")
SSM_LETTER, ATTENTION_LETTER = "M", "*"


# ---------------------------------------------------------------------------------------------------- configs

def _unknown(given: dict, known, where: str, name: str) -> None:
    extra = sorted(set(given) - set(known) - INIT_ONLY)
    if extra:
        raise ValueError(f"{where} {', '.join(extra)} has no counterpart in transformers' {name}")


def _differs(cfg: dict, key: str, supported, where: str, name: str) -> None:
    if cfg[key] != supported:
        raise ValueError(f"{where}.{key}={cfg[key]!r} is not supported by transformers' {name} (needs {supported!r})")


def _top(config: dict) -> dict:
    return {**TOP_DEFAULTS, **{k: v for k, v in config.items() if v is not None}}


def target(config: dict) -> str:
    """The transformers model_type a mamba-ssm config converts to, or a ValueError saying why none does."""
    top = _top(config)
    if not top["rms_norm"]:
        raise ValueError("rms_norm=false (LayerNorm) is not supported: transformers' Mamba models use RMSNorm")
    if int(top["d_intermediate"]):
        raise ValueError(f"d_intermediate={top['d_intermediate']} (a gated MLP after each mixer) is not supported: "
                         f"transformers' Mamba, Mamba2 and the M/* NemotronH layers have no MLP")
    if not config.get("attn_layer_idx"):
        return "mamba2" if mamba_host.mamba_version(config) == 2 else "mamba"
    if mamba_host.mamba_version(config) != 2:
        raise ValueError("a Mamba-1 hybrid (attn_layer_idx with Mamba1 layers) has no transformers counterpart: "
                         "NemotronH's SSM layers are Mamba-2")
    return "nemotron_h"


def _vocab(top: dict) -> int:
    return mamba_host.padded_vocab(int(top["vocab_size"]), int(top["pad_vocab_size_multiple"]))


def _common(top: dict) -> dict:
    # pad = bos = eos = 0 as transformers' scripts set them (GPT-NeoX's <|endoftext|>); a tokenizer overrides them
    return dict(vocab_size=_vocab(top), hidden_size=int(top["d_model"]), num_hidden_layers=int(top["n_layer"]),
                layer_norm_epsilon=NORM_EPS, residual_in_fp32=bool(top["residual_in_fp32"]),
                tie_word_embeddings=bool(top["tie_embeddings"]), pad_token_id=0, bos_token_id=0, eos_token_id=0)


def _mamba1(top: dict, ssm: dict) -> dict:
    _unknown(ssm, MAMBA1, "ssm_cfg", "Mamba")
    s = {**MAMBA1, **ssm}
    d_model = int(top["d_model"])
    dt_rank = math.ceil(d_model / 16) if s["dt_rank"] == "auto" else int(s["dt_rank"])
    return dict(model_type="mamba", **_common(top), state_size=int(s["d_state"]), expand=s["expand"],
                conv_kernel=int(s["d_conv"]), time_step_rank=dt_rank, use_bias=bool(s["bias"]),
                use_conv_bias=bool(s["conv_bias"]), time_step_min=s["dt_min"], time_step_max=s["dt_max"],
                time_step_floor=s["dt_init_floor"], time_step_scale=s["dt_scale"], time_step_init_scheme=s["dt_init"])


def _mamba2_fields(top: dict, ssm: dict, name: str) -> dict:
    """The Mamba-2 mixer's settings, checked against what transformers' Mamba2 mixers compute."""
    _unknown(ssm, MAMBA2, "ssm_cfg", name)
    s = {**MAMBA2, **ssm}
    d_inner = int(s["expand"] * int(top["d_model"]))
    if s["d_ssm"] is not None and int(s["d_ssm"]) != d_inner:
        raise ValueError(f"ssm_cfg.d_ssm={s['d_ssm']} (an SSM narrower than d_inner={d_inner}, with a gated MLP "
                         f"beside it) is not supported by transformers' {name}")
    for key, supported in (("D_has_hdim", False), ("rmsnorm", True), ("norm_before_gate", False)):
        _differs(s, key, supported, "ssm_cfg", name)
    if d_inner % int(s["headdim"]):
        raise ValueError(f"d_inner={d_inner} is not a multiple of ssm_cfg.headdim={s['headdim']}")
    return dict(s, d_inner=d_inner, nheads=d_inner // int(s["headdim"]),
                dt_limit=(float(s["dt_limit"][0]), float(s["dt_limit"][1])))


def _grouped_norm() -> bool:
    """Whether the installed transformers' Mamba2 normalises its gated norm per group, as mamba-ssm does (transformers
    5.17 normalised over all groups at once; 5.23 does it per group)."""
    from transformers.models.mamba2 import modeling_mamba2

    return "group_size" in inspect.signature(modeling_mamba2.MambaRMSNormGated.__init__).parameters


def _mamba2(top: dict, ssm: dict) -> dict:
    s = _mamba2_fields(top, ssm, "Mamba2")
    if int(s["ngroups"]) > 1 and not _grouped_norm():
        raise ValueError(f"ssm_cfg.ngroups={s['ngroups']}: this transformers version's Mamba2 normalises the gated norm "
                         f"over all groups at once, mamba-ssm per group; a newer transformers computes the same model")
    return dict(model_type="mamba2", **_common(top), state_size=int(s["d_state"]), expand=s["expand"],
                head_dim=int(s["headdim"]), num_heads=s["nheads"], n_groups=int(s["ngroups"]),
                chunk_size=int(s["chunk_size"]), conv_kernel=int(s["d_conv"]), use_bias=bool(s["bias"]),
                use_conv_bias=bool(s["conv_bias"]), time_step_min=s["dt_min"], time_step_max=s["dt_max"],
                time_step_floor=s["dt_init_floor"], time_step_limit=list(s["dt_limit"]),
                norm_before_gate=False, rms_norm=True)


def _attention(top: dict, attn: dict) -> dict:
    """MHA's settings, checked against NemotronH's attention (causal, no positions, q/k/v/o projections only)."""
    _unknown(attn, {*MHA, "num_heads"}, "attn_cfg", "NemotronH attention")
    a = {**MHA, **attn}
    if "num_heads" not in attn:
        raise ValueError("attn_cfg.num_heads is missing (MHA has no default for it)")
    _differs(a, "causal", True, "attn_cfg", "NemotronH attention")
    for key in ("rotary_emb_dim", "mlp_dim", "d_conv"):
        _differs(a, key, 0, "attn_cfg", "NemotronH attention")
    if bool(a["qkv_proj_bias"]) != bool(a["out_proj_bias"]):
        raise ValueError(f"attn_cfg.qkv_proj_bias={a['qkv_proj_bias']} and out_proj_bias={a['out_proj_bias']} differ: "
                         f"NemotronH has one attention_bias for q, k, v and o")
    heads = int(a["num_heads"])
    head_dim = int(a["head_dim"] or int(top["d_model"]) // heads)
    if a["softmax_scale"] is not None and not math.isclose(float(a["softmax_scale"]), head_dim ** -0.5):
        raise ValueError(f"attn_cfg.softmax_scale={a['softmax_scale']} is not supported: NemotronH scales by "
                         f"head_dim**-0.5 = {head_dim ** -0.5:.6g}")
    return dict(num_attention_heads=heads, num_key_value_heads=int(a["num_heads_kv"] or heads), head_dim=head_dim,
                attention_bias=bool(a["qkv_proj_bias"]), attention_dropout=0.0)


def _nemotron_h(top: dict, ssm: dict, attn: dict, attention_layers: list[int]) -> dict:
    s = _mamba2_fields(top, ssm, "NemotronH")
    low, high = s["dt_limit"]
    n_layer = int(top["n_layer"])
    if any(not 0 <= i < n_layer for i in attention_layers):
        raise ValueError(f"attn_layer_idx {attention_layers} lies outside the {n_layer} layers")
    pattern = "".join(ATTENTION_LETTER if i in attention_layers else SSM_LETTER for i in range(n_layer))
    # hybrid_override_pattern, which every NemotronH config version reads (transformers 5 turns it into
    # layers_block_type); the mixer's dt clamp is time_step_min (DT_FLOOR)
    return dict(model_type="nemotron_h", **_common(top), hybrid_override_pattern=pattern, **_attention(top, attn),
                mamba_num_heads=s["nheads"], mamba_head_dim=int(s["headdim"]), ssm_state_size=int(s["d_state"]),
                n_groups=int(s["ngroups"]), conv_kernel=int(s["d_conv"]), expand=s["expand"],
                chunk_size=int(s["chunk_size"]), use_conv_bias=bool(s["conv_bias"]), use_bias=bool(s["bias"]),
                mamba_proj_bias=bool(s["bias"]), mamba_hidden_act="silu", time_step_min=max(low, DT_FLOOR),
                time_step_max=s["dt_max"], time_step_floor=s["dt_init_floor"], time_step_limit=[low, high])


def transformers_config(mamba_config: dict, tokenizer=None) -> dict:
    """The transformers config.json dict (with `model_type`) of a mamba-ssm config dict; a ValueError of one line for
    a model transformers cannot compute. A tokenizer, if given, sets the special token ids."""
    kind = target(mamba_config)
    top = _top(mamba_config)
    ssm = dict(mamba_config.get("ssm_cfg") or {})
    if kind == "mamba":
        config = _mamba1(top, ssm)
    elif kind == "mamba2":
        config = _mamba2(top, ssm)
    else:
        config = _nemotron_h(top, ssm, dict(mamba_config.get("attn_cfg") or {}),
                             sorted(int(i) for i in mamba_config["attn_layer_idx"]))
    if tokenizer is not None:
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            if getattr(tokenizer, name, None) is not None:
                config[name] = int(getattr(tokenizer, name))
    return config


def _layer_kinds(config: dict) -> str:
    """A NemotronH config's layers as pattern letters, M and * only."""
    pattern = config.get("hybrid_override_pattern")
    if config.get("layers_block_type"):
        letters = {**dict.fromkeys(SSM_KINDS, SSM_LETTER), **dict.fromkeys(ATTENTION_KINDS, ATTENTION_LETTER)}
        unknown = sorted(set(config["layers_block_type"]) - set(letters))
        if unknown:
            raise ValueError(f"NemotronH layers of type {', '.join(unknown)} (MLP or MoE) have no mamba-ssm "
                             f"counterpart without d_intermediate: only Mamba-2 (M) and attention (*) layers convert")
        pattern = "".join(letters[kind] for kind in config["layers_block_type"])
    if not pattern or set(pattern) - {SSM_LETTER, ATTENTION_LETTER}:
        raise ValueError(f"NemotronH layer pattern {pattern!r}: only Mamba-2 (M) and attention (*) layers convert "
                         f"to mamba-ssm")
    return pattern


def mamba_ssm_config(config: dict, dt_limit=None, attention_bias: bool | None = None) -> dict:
    """The mamba-ssm config dict of a NemotronH config dict (M and * layers only). `dt_limit`: the mixers' dt clamp
    as the built model applies it (default: read from the config); `attention_bias`: whether the attention layers
    have biases (default: the config's attention_bias)."""
    if config.get("model_type") != "nemotron_h":
        raise ValueError(f"model_type {config.get('model_type')!r}: only NemotronH (nemotron_h) hybrids convert back "
                         f"to mamba-ssm")
    pattern = _layer_kinds(config)
    for key, supported in (("mamba_hidden_act", "silu"), ("layer_norm_epsilon", NORM_EPS), ("sliding_window", None)):
        if config.get(key, supported) != supported:
            raise ValueError(f"{key}={config[key]!r} is not supported: mamba-ssm's hybrid needs {supported!r}")
    d_model = int(config["hidden_size"])
    d_inner = int(config["mamba_num_heads"]) * int(config["mamba_head_dim"])
    if d_inner % d_model:
        raise ValueError(f"the Mamba-2 width mamba_num_heads * mamba_head_dim = {d_inner} is not a multiple of "
                         f"hidden_size={d_model}: mamba-ssm's Mamba2 has d_inner = expand * d_model")
    if dt_limit is None:
        dt_limit = config.get("time_step_limit") or (0.0, INF)
    low = 0.0 if float(dt_limit[0]) <= DT_FLOOR else float(dt_limit[0])  # DT_FLOOR stands for mamba-ssm's 0
    bias = bool(config.get("attention_bias", False)) if attention_bias is None else bool(attention_bias)
    heads = int(config["num_attention_heads"])
    ssm_cfg = dict(layer="Mamba2", d_state=int(config["ssm_state_size"]), d_conv=int(config["conv_kernel"]),
                   expand=d_inner // d_model, headdim=int(config["mamba_head_dim"]), ngroups=int(config["n_groups"]),
                   chunk_size=int(config["chunk_size"]), dt_max=config.get("time_step_max", MAMBA2["dt_max"]),
                   dt_init_floor=config.get("time_step_floor", MAMBA2["dt_init_floor"]),
                   dt_limit=[low, float(dt_limit[1])], bias=bool(config.get("use_bias", False)),
                   conv_bias=bool(config.get("use_conv_bias", True)))
    if float(config.get("time_step_min", DT_FLOOR)) > DT_FLOOR:
        ssm_cfg["dt_min"] = config["time_step_min"]
    attn_cfg = dict(num_heads=heads, num_heads_kv=int(config.get("num_key_value_heads") or heads),
                    head_dim=int(config.get("head_dim") or d_model // heads), causal=True, qkv_proj_bias=bias,
                    out_proj_bias=bias, rotary_emb_dim=0)
    # the vocabulary is already padded (pad_vocab_size_multiple 1 keeps it)
    return dict(d_model=d_model, d_intermediate=0, n_layer=len(pattern), vocab_size=int(config["vocab_size"]),
                ssm_cfg=ssm_cfg, attn_layer_idx=[i for i, kind in enumerate(pattern) if kind == ATTENTION_LETTER],
                attn_cfg=attn_cfg, rms_norm=True, residual_in_fp32=bool(config.get("residual_in_fp32", False)),
                fused_add_norm=True, pad_vocab_size_multiple=1,
                tie_embeddings=bool(config.get("tie_word_embeddings", False)))


# ---------------------------------------------------------------------------------------------------- weights

def split_qkv(tensor: torch.Tensor, heads: int, kv_heads: int, head_dim: int) -> tuple[torch.Tensor, ...]:
    """q, k, v of MHA's fused in_proj weight (rows) or bias, as its forward splits them: `q, kv = qkv.split(...)`,
    then kv "... (two hkv d) -> ... two hkv d": the first half of kv is k, the second v."""
    q, kv = tensor.split([heads * head_dim, 2 * kv_heads * head_dim], dim=0)
    k, v = kv.unflatten(0, (2, kv_heads * head_dim)).unbind(0)
    return q, k, v


def _attention_dims(config: dict) -> tuple[int, int, int]:
    heads = int(config["num_attention_heads"])
    return heads, int(config["num_key_value_heads"]), int(config["head_dim"])


def transformers_state(state: dict, config: dict) -> dict:
    """mamba-ssm's state dict in the names (and for NemotronH attention, the split) of the transformers model of
    `config` (a `transformers_config` dict)."""
    if config["model_type"] != "nemotron_h":  # same names but the embedding, as transformers' load_hook renames it
        return {key.replace("backbone.embedding.", "backbone.embeddings."): value for key, value in state.items()}
    pattern = _layer_kinds(config)
    dims = _attention_dims(config)
    out = {}
    for key, value in state.items():
        key = key.replace("backbone.embedding.", "model.embeddings.").replace("backbone.", "model.")
        parts = key.split(".")
        if parts[1] == "layers" and parts[3] == "mixer" and pattern[int(parts[2])] == ATTENTION_LETTER:
            prefix, name, kind = ".".join(parts[:4]), parts[4], parts[5]
            if name == "in_proj":
                for proj, piece in zip(("q_proj", "k_proj", "v_proj"), split_qkv(value, *dims)):
                    out[f"{prefix}.{proj}.{kind}"] = piece
                continue
            key = f"{prefix}.o_proj.{kind}" if name == "out_proj" else key
        out[key] = value
    return out


def mamba_ssm_state(state: dict, config: dict) -> dict:
    """A NemotronH state dict (M and * layers) in mamba-ssm's names, q/k/v fused back into MHA's in_proj."""
    pattern = _layer_kinds(config)
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[:2] == ["model", "layers"] and parts[3] == "mixer" and pattern[int(parts[2])] == ATTENTION_LETTER:
            prefix, name, kind = ".".join(["backbone", *parts[1:4]]), parts[4], parts[5]
            if name in ("k_proj", "v_proj"):
                continue  # fused with q_proj below
            if name == "q_proj":
                qkv = [state[f"{'.'.join(parts[:4])}.{proj}.{kind}"] for proj in ("q_proj", "k_proj", "v_proj")]
                out[f"{prefix}.in_proj.{kind}"] = torch.cat(qkv, dim=0)
            else:
                out[f"{prefix}.out_proj.{kind}"] = value
            continue
        out[key.replace("model.embeddings.", "backbone.embedding.").replace("model.", "backbone.", 1)] = value
    return out


def _load(model, state: dict, what: str) -> None:
    """A strict load with a ValueError of one line for keys or shapes that do not fit, each tensor keeping its own
    dtype (mamba-ssm's float32 A_log and D in a half-precision model)."""
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if any(key.endswith("_proj.bias") and ".mixer." in key for key in unexpected):
        raise ValueError(f"{what} has no attention biases in this transformers version (its NemotronH attention "
                         f"ignores attention_bias): only MHA layers with qkv_proj_bias=out_proj_bias=false convert")
    if missing or unexpected:
        raise ValueError(f"{what} does not fit the converted weights: missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}")
    wrong = [key for key in state if tuple(state[key].shape) != tuple(expected[key].shape)]
    if wrong:
        raise ValueError(f"{what} does not fit the converted weights: {wrong[0]} has shape "
                         f"{tuple(state[wrong[0]].shape)}, expected {tuple(expected[wrong[0]].shape)}")
    model.load_state_dict(state, strict=True)
    parameters = dict(model.named_parameters(remove_duplicate=False))
    for key, tensor in state.items():
        if key in parameters and parameters[key].dtype != tensor.dtype:
            parameters[key].data = tensor.detach().to(parameters[key].device, copy=True)


def _placement(model) -> tuple[torch.device, torch.dtype]:
    """Where a model lives and its dtype (its lm_head's: A_log and D may differ)."""
    return model.lm_head.weight.device, model.lm_head.weight.dtype


def _mixers(model, kinds: tuple[str, ...]) -> list:
    return [layer.mixer for layer in model.model.layers if getattr(layer, "block_type", None) in kinds]


def _check_dt_limit(model, dt_limit: list[float]) -> None:
    """NemotronH's mixers clamp dt where their transformers version says (time_step_min or time_step_limit): the
    converted model must clamp where mamba-ssm's does."""
    for mixer in _mixers(model, SSM_KINDS):
        low, high = getattr(mixer, "time_step_limit", dt_limit)
        if (0.0 if low <= DT_FLOOR else low, high) != tuple(dt_limit):
            raise ValueError(f"ssm_cfg.dt_limit={list(dt_limit)} is not supported: this transformers version's "
                             f"NemotronH mixer clamps dt to ({low:g}, {high:g})")


# ---------------------------------------------------------------------------------------------------- models

def to_transformers(model, tokenizer=None):
    """The transformers model (eval mode, on the input's device, each tensor in its dtype) equal to a mamba-ssm
    `MambaLMHeadModel`: MambaForCausalLM, Mamba2ForCausalLM or NemotronHForCausalLM (module docstring)."""
    if not mamba_host.is_model(model) or hf_host.is_model(model):
        raise ValueError(f"to_transformers takes a mamba-ssm MambaLMHeadModel, not a {type(model).__name__}")
    config = transformers_config(dict(model.config.__dict__), tokenizer)
    device, dtype = _placement(model)
    converted = hf_host.build_model(config, device, dtype, seed=None)
    if config["model_type"] == "nemotron_h":
        _check_dt_limit(converted, config["time_step_limit"])
    _load(converted, transformers_state(model.state_dict(), config), type(converted).__name__)
    return converted.eval()


def nemotron_h_to_mamba_ssm(model):
    """The mamba-ssm hybrid (`MambaLMHeadModel`, eval mode, same device and dtypes) equal to a NemotronH model of
    Mamba-2 (M) and attention (*) layers only."""
    config = model.config.to_dict()
    state = model.state_dict()
    mixers = _mixers(model, SSM_KINDS)
    dt_limit = getattr(mixers[0], "time_step_limit", None) if mixers else None
    attention_bias = any(key.endswith(".q_proj.bias") for key in state)  # the modules', whatever the config says
    mamba_config = mamba_ssm_config(config, dt_limit, attention_bias)
    # a transformers version that does not tie NemotronH's embeddings may have trained them apart
    head, embedding = state["lm_head.weight"], state["model.embeddings.weight"]
    mamba_config["tie_embeddings"] &= bool(torch.equal(head, embedding))
    device, dtype = _placement(model)
    converted = mamba_host.build_model(mamba_config, device, dtype, seed=None)
    _load(converted, mamba_ssm_state(state, config), "MambaLMHeadModel")
    return converted.eval()


def to_mamba_ssm(model):
    """The mamba-ssm model equal to a transformers model: NemotronH hybrids of M and * layers, the one way back offered
    here (a hybrid trained in transformers runs on mamba-ssm)."""
    if not hf_host.is_model(model):
        raise ValueError(f"to_mamba_ssm takes a transformers model, not a {type(model).__name__}")
    if model.config.model_type != "nemotron_h":
        raise ValueError(f"model_type {model.config.model_type!r}: only NemotronH (nemotron_h) hybrids convert back to "
                         f"mamba-ssm")
    return nemotron_h_to_mamba_ssm(model)


# ---------------------------------------------------------------------------------------------------- command line

DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def stored_dtype(directory: Path) -> torch.dtype:
    """The dtype of a checkpoint's embedding, read without loading the file (memory-mapped)."""
    try:
        state = torch.load(directory / mamba_host.WEIGHTS, map_location="cpu", weights_only=True, mmap=True)
        return state["backbone.embedding.weight"].dtype
    except (RuntimeError, OSError, KeyError, ValueError):
        return torch.float32  # load_model, which read it first, has the clear errors about the file


def _check_paths(source: Path, destination: Path) -> None:
    if not source.is_dir():
        raise ValueError(f"SRC {str(source)!r} is not a directory (a mamba-ssm checkpoint: config.json + "
                         f"{mamba_host.WEIGHTS})")
    if destination.resolve() == source.resolve():
        raise ValueError("DST is SRC: write the transformers checkpoint to another directory")
    if destination.exists() and (not destination.is_dir() or any(destination.iterdir())):
        raise ValueError(f"DST {str(destination)!r} exists and is not an empty directory")


def convert_directory(source: str, destination: str, dtype: str | None = None) -> str:
    """Read a mamba-ssm checkpoint directory and write the transformers one; returns its model_type."""
    src, dst = Path(source).expanduser(), Path(destination).expanduser()
    _check_paths(src, dst)
    config = source_config(str(src))
    if "model_type" in config:
        raise ValueError(f"SRC {str(src)!r} is a transformers checkpoint (model_type {config['model_type']!r}), "
                         f"not a mamba-ssm one")
    target(config)  # an unsupported model is refused before its weights are read
    model = mamba_host.load_model(str(src), "cpu", "float32")  # exact for every stored dtype
    tokenizer = mamba_host.load_tokenizer(str(src)) if any((src / f).is_file() for f in TOKENIZER_FILES) else None
    converted = to_transformers(model, tokenizer)
    converted.to(DTYPES[dtype] if dtype else stored_dtype(src))
    hf_host.save_model(converted, dst, tokenizer=tokenizer)
    if tokenizer is None:
        print(f"note: {src} has no tokenizer files; {dst} holds the model only", file=sys.stderr)
    return converted.config.model_type


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ssmcompress.convert",
                                     description="Convert a mamba-ssm checkpoint directory into a transformers one "
                                                 "(Mamba, Mamba2 or a NemotronH hybrid).")
    parser.add_argument("src", metavar="SRC", help="mamba-ssm checkpoint directory (config.json, pytorch_model.bin, "
                                                    "tokenizer files)")
    parser.add_argument("dst", metavar="DST", help="new (or empty) directory for the transformers checkpoint")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="dtype of the written weights (default: that of SRC's weights)")
    args = parser.parse_args(argv)
    try:
        model_type = convert_directory(args.src, args.dst, args.dtype)
    except ValueError as error:  # ConfigError / ModelSourceError are ValueErrors too
        print(f"error: {str(error).splitlines()[0] if str(error) else type(error).__name__}", file=sys.stderr)
        return 2
    print(f"wrote {model_type} checkpoint to {args.dst}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
