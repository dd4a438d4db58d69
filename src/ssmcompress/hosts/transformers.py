"""The transformers host: `AutoModelForCausalLM` models, token reduction on its SSMs and SSM-attention hybrids.

Loading. A source is a hub name (`state-spaces/mamba2-2.7b-hf`... any causal LM) or a local directory in the hub's
format, as `save_pretrained` writes it: config.json (with `model_type`), model.safetensors or pytorch_model.bin (or a
sharded index), tokenizer files. Everything is `AutoModelForCausalLM`'s own loading; added here are errors of one line
and the per-device kernel routing of transformers' SSM modules (`compat.route_transformers`). Any causal LM loads
(dense evaluation, weight pruning); the families in FAMILIES can also be token-reduced.

Reduction: what the reducer needs from a decoder-layer model, one entry per family in FAMILIES.
- Layers: `model.backbone.layers` (Mamba, Mamba2, FalconMamba) or `model.model.layers`, each of one kind
  (`architecture`), read from the config's `layer_types` / `layers_block_type` (both spellings transformers has used:
  mamba / attention and linear_attention / full_attention).
- Importance: the input of the SSM mixer's `out_proj` (the gated-norm output of y on Mamba-2 mixers, y·silu(z) on
  Mamba-1 mixers: the signal the paper scores, as on mamba-ssm), or of an attention module's `o_proj`.
- The two streams. transformers' layers add the residual inside the layer and return one tensor, where mamba-ssm's
  blocks return (hidden_states, residual) and let the next block add them. The layer's last residual branch is read
  where it is computed: `hidden` is that branch's output (the mixer's in a one-branch layer, the feed-forward block's
  where one follows the mixer; times GraniteMoeHybrid's residual multiplier), captured by a forward hook on the
  branch's module(s); `residual` is what it is added to, captured as the input of the layer (cast to float32 where
  the layer keeps its residual in float32) or of the branch's pre-norm. Both are reduced, and the layer returns
  residual + hidden: the layer's own addition, so that a token that is kept gets exactly the layer's output, and
  `ours` and every per-stream method mean on this host what they mean on mamba-ssm (a test converts mamba-ssm models
  and compares kept positions and scores).
- Context. The model computes the attention masks, position ids and rotary cos/sin once for the full sequence and
  passes them to every layer; a forward pre-hook on every layer after the first reduction layer replaces them with
  those of the kept tokens: the rotary cos/sin and position ids gathered at the kept tokens' original positions, the
  causal mask rebuilt for the kept tokens by transformers' own `create_causal_mask` (the kept tokens keep their
  order, so causality over slots is causality over positions; filler slots come after every real token), the SSM
  layers' padding mask cut to the kept slots. Masks that were None (no padding; SDPA's is_causal) stay None.
  Caches: a prefill's attention layers cache the keys and values of the tokens they saw, rotated at their original
  positions; generate's position ids count on from the prompt's length, so decoding continues at the original
  position count. A static cache (generation on a GPU: `generate`'s compiled, CUDA-graph decoding) holds every
  attention layer's keys in slots of the prompt's full length plus the new tokens, each layer writing after the
  slots it has filled (transformers' per-layer `cumulative_length`), while the mask generate builds admits every slot
  up to the original position: after a reduced prefill an attention layer would attend to slots it never wrote.
  During a generation with a reducer, a pre-hook on each attention layer gives it the mask of the slots it has
  written (`attach_written_slots`).
"""
from __future__ import annotations

import contextlib
import importlib
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from ssmcompress import architecture, compat, hub
from ssmcompress.errors import ConfigError, ModelSourceError
from ssmcompress.hosts import mamba2_dt
from ssmcompress.models import (check_settings, check_tokenizer, load_tokenizer, needs_tokenizer,  # noqa: F401
                                resolve_device, resolve_dtype, source_config)

# generation decodes into transformers' dynamic cache unless asked for graphs (cg=True: a static cache, whose
# decoding step generate compiles, torch.compile's reduce-overhead mode: CUDA graph replays on a GPU); not by default,
# since it compiles once per shape and lm-eval's prompts come in many lengths (the generation benchmark asks for it)
CUDA_GRAPHS = False
STATIC_MASKS = ("sdpa", "eager")  # the attention implementations whose masks `attach_written_slots` writes
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
# layer_types / layers_block_type values -> architecture's kinds (older and newer transformers spellings)
KIND_OF = {"mamba": architecture.SSM, "linear_attention": architecture.SSM, "m2": architecture.SSM,
           "attention": architecture.ATTENTION, "full_attention": architecture.ATTENTION,
           "hybrid": architecture.PARALLEL, "mlp": architecture.MLP, "moe": architecture.MOE}


@dataclass(frozen=True)
class Family:
    """Where a family keeps what the reducer reaches for (attribute names on a decoder layer)."""

    describe: object  # (config object) -> the family's part of the architecture description
    layers: str = "model.layers"  # the decoder layers, from the CausalLM
    mixer: str = "mamba"  # the SSM mixer
    attention: str = "self_attn"  # the attention module
    residual: str | None = None  # the module whose input is the residual the last branch adds to (None: the layer's)
    branch: tuple[str, ...] = ("feed_forward",)  # modules whose outputs, summed in order, are that branch
    scale: str | None = None  # a layer attribute the branch is multiplied by before it is added
    positions: str = "rotary"  # the attention's position signal (documentation): rotary | none | config


def _kinds(c) -> str:
    names = getattr(c, "layer_types", None) or getattr(c, "layers_block_type", None)
    if names is None:
        return architecture.SSM * int(c.num_hidden_layers)
    unknown = sorted(set(names) - set(KIND_OF))
    if unknown:
        raise ValueError(f"unknown layer types {unknown} (known: {', '.join(KIND_OF)})")
    return "".join(KIND_OF[name] for name in names)


def _mamba2(c, prefix: str, expand: str, heads: str, head_dim: str, groups: str, state: str, conv: str,
            chunk: str) -> dict:
    def get(name):
        return getattr(c, f"{prefix}{name}")

    d_inner = int(get(expand) * c.hidden_size) if expand else int(get(heads) * get(head_dim))
    return dict(mamba_version=2, d_inner=d_inner, d_state=int(get(state)), d_conv=int(get(conv)), nheads=int(get(heads)),
                headdim=int(get(head_dim)), ngroups=int(get(groups)), chunk_size=int(get(chunk)), gated_norm=1)


def _attention(c) -> dict:
    heads = int(c.num_attention_heads)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    return dict(attn_heads=heads, attn_kv_heads=int(getattr(c, "num_key_value_heads", None) or heads),
                attn_head_dim=int(head_dim))


def describe_mamba(c) -> dict:
    return dict(mamba_version=1, d_inner=int(c.intermediate_size), d_state=int(c.state_size), d_conv=int(c.conv_kernel),
                dt_rank=int(c.time_step_rank))


def describe_mamba2(c) -> dict:
    return _mamba2(c, "", "expand", "num_heads", "head_dim", "n_groups", "state_size", "conv_kernel", "chunk_size")


def describe_bamba(c) -> dict:
    return dict(_mamba2(c, "mamba_", "expand", "n_heads", "d_head", "n_groups", "d_state", "d_conv", "chunk_size"),
                **_attention(c), ffn=architecture.FFN_GATED * int(c.num_hidden_layers),
                mlp_size=int(c.intermediate_size), mlp_gated=1)


def describe_granitemoehybrid(c) -> dict:
    info = dict(_mamba2(c, "mamba_", "expand", "n_heads", "d_head", "n_groups", "d_state", "d_conv", "chunk_size"),
                **_attention(c))
    if int(getattr(c, "num_local_experts", 0) or 0) > 0:
        return dict(info, ffn=architecture.FFN_MOE * int(c.num_hidden_layers), moe_experts=int(c.num_local_experts),
                    moe_top_k=int(c.num_experts_per_tok), moe_size=int(c.intermediate_size),
                    moe_shared_size=int(c.shared_intermediate_size), moe_gated=1)
    return dict(info, ffn=architecture.FFN_GATED * int(c.num_hidden_layers), mlp_size=int(c.shared_intermediate_size),
                mlp_gated=1)


def describe_nemotron_h(c) -> dict:
    info = dict(_mamba2(c, "", None, "mamba_num_heads", "mamba_head_dim", "n_groups", "ssm_state_size", "conv_kernel",
                        "chunk_size"), **_attention(c))
    kinds = _kinds(c)
    if architecture.MLP in kinds:
        info.update(mlp_size=int(c.intermediate_size), mlp_gated=0)  # relu2: up and down projections
    if architecture.MOE in kinds:
        info.update(moe_experts=int(c.n_routed_experts), moe_top_k=int(c.num_experts_per_tok),
                    moe_size=int(c.moe_intermediate_size),
                    moe_shared_size=int(c.moe_shared_expert_intermediate_size) * int(c.n_shared_experts), moe_gated=0)
    return info


def describe_falcon_h1(c) -> dict:
    info = _mamba2(c, "mamba_", "expand", "n_heads", "d_head", "n_groups", "d_state", "d_conv", "chunk_size")
    if getattr(c, "mamba_d_ssm", None):
        info["d_inner"] = int(c.mamba_d_ssm)
    info["gated_norm"] = int(bool(getattr(c, "mamba_rms_norm", False)))
    return dict(info, **_attention(c), ffn=architecture.FFN_GATED * int(c.num_hidden_layers),
                mlp_size=int(c.intermediate_size), mlp_gated=1)


def describe_jamba(c) -> dict:
    n = int(c.num_hidden_layers)
    experts = int(getattr(c, "num_experts", 1) or 1)
    moe = [experts > 1 and i % int(c.expert_layer_period) == int(c.expert_layer_offset) for i in range(n)]
    info = dict(mamba_version=1, d_inner=int(c.mamba_expand * c.hidden_size), d_state=int(c.mamba_d_state),
                d_conv=int(c.mamba_d_conv), dt_rank=int(c.mamba_dt_rank), **_attention(c),
                ffn="".join(architecture.FFN_MOE if m else architecture.FFN_GATED for m in moe),
                mlp_size=int(c.intermediate_size), mlp_gated=1)
    if any(moe):
        info.update(moe_experts=experts, moe_top_k=int(c.num_experts_per_tok), moe_size=int(c.intermediate_size),
                    moe_shared_size=0, moe_gated=1)
    return info


ONE_BRANCH = dict(layers="backbone.layers", mixer="mixer", residual=None, branch=("mixer",), positions="none")
FAMILIES = {
    "mamba": Family(describe_mamba, **ONE_BRANCH),
    "falcon_mamba": Family(describe_mamba, **ONE_BRANCH),
    "mamba2": Family(describe_mamba2, **ONE_BRANCH),
    "nemotron_h": Family(describe_nemotron_h, mixer="mixer", attention="mixer", residual=None, branch=("mixer",),
                         positions="none"),
    "bamba": Family(describe_bamba, residual="pre_ff_layernorm"),
    "granitemoehybrid": Family(describe_granitemoehybrid, residual="post_attention_layernorm",
                               branch=("block_sparse_moe", "shared_mlp"), scale="residual_multiplier",
                               positions="config"),  # position_embedding_type: rope or nope
    "falcon_h1": Family(describe_falcon_h1, residual="pre_ff_layernorm"),
    "jamba": Family(describe_jamba, residual="pre_ff_layernorm", positions="none"),
}
# families transformers has that the reducer cannot serve yet, and what is missing
UNSUPPORTED = {
    "zamba2": "its shared attention blocks read every position's embedding (original_hidden_states), a third "
              "stream the reducer does not carry",
    "zamba": "its shared attention blocks read every position's embedding (original_hidden_states), a third stream "
             "the reducer does not carry",
}


def is_model(model) -> bool:
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


# ---------------------------------------------------------------------------------------------------- architecture

SPECIAL_FLOATS = {"Infinity": float("inf"), "-Infinity": float("-inf"), "NaN": float("nan")}


def decode_floats(value):
    """config.json as transformers writes it stores inf and nan as {"__float__": "Infinity"} (JSON has none); its own
    reader decodes them in a private method, so a config dict read here is decoded the same way."""
    if isinstance(value, dict):
        if set(value) == {"__float__"} and value["__float__"] in SPECIAL_FLOATS:
            return SPECIAL_FLOATS[value["__float__"]]
        return {key: decode_floats(item) for key, item in value.items()}
    if isinstance(value, list):
        return [decode_floats(item) for item in value]
    return value


def transformers_config(config: dict):
    """The `PretrainedConfig` of a config dict (config.json's fields, `model_type` included)."""
    from transformers import AutoConfig

    fields = decode_floats(dict(config))
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def info_from_config(config: dict) -> dict:
    """The architecture description of a config dict: for the families in FAMILIES the whole of it (layer kinds, the
    SSM mixer, attention, feed-forward blocks), for other causal LMs what the logs show."""
    c = transformers_config(config)
    info = dict(family="hf", model_type=c.model_type, d_model=int(c.hidden_size), n_layer=int(c.num_hidden_layers),
                vocab_size=int(c.vocab_size))
    family = FAMILIES.get(c.model_type)
    if family is None:
        heads = getattr(c, "num_attention_heads", None)
        return info if heads is None else dict(info, n_head=int(heads))
    info["layers"] = _kinds(c)
    return dict(info, **family.describe(c))


def model_info(model) -> dict:
    """The architecture description of a built model, with its parameter count."""
    info = info_from_config(model.config.to_dict())
    return dict(info, vocab_size=int(lm_head(model).weight.shape[0]), params=sum(p.numel() for p in model.parameters()))


def described(info: dict) -> bool:
    """Whether the description covers the model's layers (its family is in FAMILIES): FLOPs, reduction."""
    return "layers" in info


def check_reduction(info: dict) -> None:
    """What token reduction cannot do on this model: a ConfigError before any work."""
    model_type = info.get("model_type")
    if model_type in UNSUPPORTED:
        raise ConfigError(f"token reduction does not support {model_type} models: {UNSUPPORTED[model_type]}")
    if not described(info):
        raise ConfigError(f"token reduction has no adapter for transformers {model_type!r} models (it reduces the "
                          f"SSM and hybrid families: {', '.join(FAMILIES)}); use method=dense (weight pruning, "
                          f"pruner=..., works on any causal LM)")


# ---------------------------------------------------------------------------------------------------- sources

def check_weights(source: str) -> None:
    path = Path(source).expanduser()
    if path.is_dir():
        if not any((path / name).is_file() for name in WEIGHT_FILES):
            raise ModelSourceError(f"model directory {source!r} has config.json but no weights "
                                   f"({', '.join(WEIGHT_FILES)})")
    else:
        hub.require(source)  # the repository answers (transformers picks its weight files)


def load_config(source: str) -> dict:
    """config.json of a local directory or hub model, which must name a transformers `model_type`."""
    path = Path(source).expanduser()
    if path.exists() and not path.is_dir():
        raise ModelSourceError(f"model path {source!r} is a file; give the directory holding config.json")
    if path.is_dir() and not (path / "config.json").is_file():
        raise ModelSourceError(f"model directory {source!r} has no config.json (expected the Hugging Face format "
                               f"that save_pretrained writes: config.json + model.safetensors)")
    config = source_config(source)
    if "model_type" not in config:
        raise ModelSourceError(f"{source!r}: config.json has no model_type, so it is not a transformers model; a "
                               f"mamba-ssm model needs family: mamba (or no family: config.json decides)")
    return config


def check_config(cfg) -> dict:
    """The `model` section of a transformers model, before any work (models.check_settings, the source's
    config.json, weights and tokenizer). Returns its config dict."""
    model = check_settings(cfg)
    if model["random_init"]:
        config = model["config"]
        if "model_type" not in config:
            raise ModelSourceError("model.config of a transformers model needs its model_type (e.g. mamba2, bamba)")
    else:
        config = load_config(model["path"])
        check_weights(model["path"])
    try:
        info_from_config(config)
    except (TypeError, ValueError, KeyError, AttributeError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[-1][:200]
        raise ModelSourceError(f"model config of {model.get('path')!r} is not a usable {config.get('model_type')} "
                               f"config: {first}") from None
    if needs_tokenizer(cfg):
        check_tokenizer(model["tokenizer"])
    return config


# ---------------------------------------------------------------------------------------------------- models

def route_kernels(model) -> None:
    """transformers' SSM kernels, routed per device (compat.route_transformers) in the model's modeling module."""
    compat.route_transformers(importlib.import_module(type(model).__module__))


def build_model(config: dict, device: str | torch.device = "cpu", dtype: str | torch.dtype = "auto",
                seed: int | None = 0):
    """A randomly initialised causal LM (transformers' own init) for a config dict, built on `device` (as mamba-ssm's
    models are: a billion parameters initialise in seconds on a GPU, minutes on its host's CPU)."""
    from transformers import AutoModelForCausalLM

    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    if seed is not None:
        torch.manual_seed(seed)
    with device:
        model = AutoModelForCausalLM.from_config(transformers_config(config), dtype=dtype)
    route_kernels(model)
    return model.to(device).eval()


def load_model(source: str, device: str | torch.device = "auto", dtype: str | torch.dtype = "auto",
               random_init: bool = False, config: dict | None = None, seed: int = 0):
    """Load a pretrained model, or build one with random weights (`random_init`, from `config` if given)."""
    from transformers import AutoModelForCausalLM

    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    if random_init:
        return build_model(config if config is not None else load_config(source), device, dtype, seed=seed)
    load_config(source)
    check_weights(source)  # a hub repository has answered, or the directory holds weights
    path = Path(source).expanduser()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path) if path.is_dir() else source, dtype=dtype)
    except OSError as error:
        raise ModelSourceError(f"cannot load {source!r}: {str(error).splitlines()[0][:200]}") from None
    route_kernels(model)
    return model.to(device).eval()


def save_model(model, directory: str | os.PathLike, tokenizer=None, dtype: torch.dtype | None = None) -> None:
    """`save_pretrained` (config.json + model.safetensors), the weights cast to `dtype` if given, and the tokenizer."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state, converted = None, {}
    if dtype is not None:  # tied tensors (embedding = lm_head) stay one tensor, which save_pretrained writes once
        state = {}
        for name, tensor in model.state_dict().items():
            key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape))
            if key not in converted:
                converted[key] = tensor.detach().to(dtype if tensor.is_floating_point() else tensor.dtype)
            state[name] = converted[key]
    model.save_pretrained(directory, state_dict=state)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


# ---------------------------------------------------------------------------------------------------- reduction

def family_of(model) -> Family:
    model_type = model.config.model_type
    if model_type not in FAMILIES:
        check_reduction(info_from_config(model.config.to_dict()))
    return FAMILIES[model_type]


def _attribute(obj, path: str):
    for name in path.split("."):
        obj = getattr(obj, name)
    return obj


def logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    """One forward: the logits at every position, without filling a cache (SSM models make one by default)."""
    return model(input_ids, use_cache=False).logits


def layers(model) -> list:
    return list(_attribute(model, family_of(model).layers))


def lm_head(model):
    return model.get_output_embeddings()


def layer_kinds(model) -> str:
    return architecture.kinds(info_from_config(model.config.to_dict()))


def importance_site(model, index: int):
    """The SSM mixer's `out_proj` (SSM and parallel layers), or the attention module's `o_proj`."""
    family, layer, kind = family_of(model), layers(model)[index], layer_kinds(model)[index]
    if architecture.has_ssm(kind):
        return getattr(layer, family.mixer).out_proj
    if kind == architecture.ATTENTION:
        return getattr(layer, family.attention).o_proj
    raise ConfigError(f"layer {index} is {architecture.layer_name(kind)}: it has no token importance signal")


# families whose mixers transform dt between the module whose output holds it and the scan
NO_DELTA = {"falcon_mamba": "it normalises dt (rms_forward) before dt_proj",
            "jamba": "it normalises dt (dt_layernorm) before dt_proj",
            "falcon_h1": "it scales in_proj's output (mup_vector) before reading dt"}


def check_delta(info: dict) -> None:
    """importance=delta on this model: a ConfigError where the hooks of attach_delta would read another Δ."""
    if info.get("model_type") in NO_DELTA:
        model_type = info["model_type"]
        raise ConfigError(f"importance=delta is not read on {model_type} models: {NO_DELTA[model_type]}")


def attach_delta(model, index: int, record) -> list:
    """Hooks that hand `record` the SSM's Δ before its softplus, (batch, length, channels), each time layer `index`'s
    mixer computes it: a Mamba-1 mixer's per channel (dt_proj of x_proj's dt columns, bias included; transformers
    applies dt_proj's weight directly), a Mamba-2 mixer's per head (in_proj's dt columns plus dt_bias). The reducer
    asks for it where reduction.check_delta allowed it (check_delta above, an SSM mixer at the layer)."""
    mixer = getattr(layers(model)[index], family_of(model).mixer)
    if hasattr(mixer, "dt_proj"):
        def from_x_proj(module, args, out):
            record(torch.nn.functional.linear(out[..., :mixer.time_step_rank], mixer.dt_proj.weight,
                                              mixer.dt_proj.bias))

        return [mixer.x_proj.register_forward_hook(from_x_proj)]
    return [mixer.in_proj.register_forward_hook(
        lambda module, args, out: record(out[..., -mixer.num_heads:] + mixer.dt_bias))]


def ssm_decay(model, index: int) -> torch.Tensor:
    """A = -exp(A_log) of layer `index`'s SSM: per head (Mamba-2 mixers), per channel and state (Mamba-1)."""
    return -torch.exp(getattr(layers(model)[index], family_of(model).mixer).A_log.float())


def attach_delta_filter(model, index: int, keep) -> list:
    """Hooks through which `keep(dt)` drops tokens from layer `index`'s Mamba-2 heads (mamba2_dt.attach_filter)."""
    mixer = getattr(layers(model)[index], family_of(model).mixer)
    return mamba2_dt.attach_filter(mixer, index, "num_heads", "time_step_limit", keep)


def fused_flags(model, index: int) -> list:
    """transformers' fused SSM path (`*_split_conv1d_scan_combined`, `mamba_inner_fn`) runs only in training."""
    return []


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def attach_streams(model, index: int, reduce) -> list:
    """Layer `index`'s output passes through `reduce(hidden, residual)` as the paper's two streams (module docstring),
    and the layer returns residual + hidden of the reduced pair (reduce returns None: the output is unchanged)."""
    family, layer = family_of(model), layers(model)[index]
    captured = {}
    branches = [name for name in family.branch if getattr(layer, name, None) is not None]

    def keep_residual(module, args, kwargs):
        residual = args[0] if args else kwargs["hidden_states"]
        if family.residual is None and getattr(module, "residual_in_fp32", False):
            residual = residual.to(torch.float32)  # as the layer casts it before adding
        captured["residual"] = residual

    def keep_branch(name, module, args, output):
        captured[name] = _first(output)

    def replace(module, args, kwargs, output):
        parts = [captured.pop(name) for name in branches]
        residual = captured.pop("residual")
        hidden = parts[0]
        for part in parts[1:]:
            hidden = hidden + part
        if family.scale is not None:
            hidden = hidden * getattr(layer, family.scale)
        reduced = reduce(hidden, residual)
        if reduced is None:
            return None
        joined = reduced[1] + reduced[0]
        return (joined, *output[1:]) if isinstance(output, tuple) else joined

    site = layer if family.residual is None else getattr(layer, family.residual)
    handles = [site.register_forward_pre_hook(keep_residual, with_kwargs=True)]
    handles += [getattr(layer, name).register_forward_hook(partial(keep_branch, name)) for name in branches]
    handles.append(layer.register_forward_hook(replace, with_kwargs=True))
    return handles


def _gather(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x (b or 1, n, ...) at each row's kept positions (b, k)."""
    b, k = positions.shape
    x = x.expand(b, *x.shape[1:])
    index = positions.reshape(b, k, *([1] * (x.dim() - 2))).expand(b, k, *x.shape[2:])
    return x.gather(1, index)


def attach_context(model, first: int, state) -> list:
    """Every layer after layer `first` receives the positions and masks of the kept tokens (module docstring), while
    `state()` (the reducer's ForwardState, None outside its calls) says which tokens they are."""
    from transformers.masking_utils import create_causal_mask

    kinds = layer_kinds(model)

    def rewrite(index, module, args, kwargs):
        current = state()
        if current is None or not current.counts:  # no reduction before this layer in this forward
            return None
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs["hidden_states"]
        memo = current.context  # the masks of this state, built once for every later layer
        for name in ("attention_mask", "mamba_attention_mask"):
            given = kwargs.get(name)
            if given is None:
                continue
            causal = name == "attention_mask" and architecture.has_attention(kinds[index])
            key = (name, causal, len(current.counts), hidden.dtype)
            if key not in memo:
                if causal:
                    memo[key] = create_causal_mask(config=model.config, inputs_embeds=hidden,
                                                   attention_mask=current.valid, past_key_values=None)
                else:
                    memo[key] = current.valid.to(given.dtype)
            kwargs[name] = memo[key]
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = _gather(kwargs["position_ids"], current.positions)
        if kwargs.get("position_embeddings") is not None:
            kwargs["position_embeddings"] = tuple(_gather(x, current.positions) for x in kwargs["position_embeddings"])
        return args, kwargs

    return [layer.register_forward_pre_hook(partial(rewrite, index), with_kwargs=True)
            for index, layer in enumerate(layers(model)) if index > first]


def attach_written_slots(model) -> list:
    """Pre-hooks on the attention layers that replace the attention mask with the slots the layer has written: query
    i of a forward that finds `written` slots filled attends to slots 0..written + i (its own included), whatever
    the mask the model built from the original positions and the first layer's cache (module docstring). Into a
    static cache always; into a dynamic one where the model materialised a mask (eager attention: one mask for
    every layer, as wide as the first layer's keys, where a reduced layer holds fewer; SDPA's None stays None).
    Generation prompts are unpadded, so causality over the written slots is the whole mask."""
    from transformers.cache_utils import DynamicLayer, StaticLayer

    kinds = layer_kinds(model)
    implementation = model.config._attn_implementation

    def restrict(index, module, args, kwargs):
        cache = kwargs.get("past_key_values")
        layer = cache.layers[index] if cache is not None and hasattr(cache, "layers") else None
        static = isinstance(layer, StaticLayer)
        if not static and not (isinstance(layer, DynamicLayer) and kwargs.get("attention_mask") is not None
                               and implementation in STATIC_MASKS and not layer.is_sliding):
            return None  # a dynamic cache whose mask is not one of ours to rewrite: as the model built it
        check_written_slot_masks(implementation, sliding=layer.is_sliding, where=f"layer {index}: ")
        hidden = args[0] if args else kwargs["hidden_states"]
        queries = torch.arange(hidden.shape[1], device=hidden.device)
        written = layer.get_seq_length()
        slots = torch.arange(layer.max_cache_len if static else written + hidden.shape[1], device=hidden.device)
        allowed = (slots[None, :] <= written + queries[:, None])[None, None]  # (1, 1, q, slots)
        if implementation == "eager":  # an additive mask
            allowed = torch.zeros(allowed.shape, dtype=hidden.dtype, device=hidden.device).masked_fill(
                ~allowed, torch.finfo(hidden.dtype).min)
        return args, {**kwargs, "attention_mask": allowed}

    return [layer.register_forward_pre_hook(partial(restrict, index), with_kwargs=True)
            for index, layer in enumerate(layers(model)) if architecture.has_attention(kinds[index])]


def check_written_slot_masks(implementation: str, sliding: bool = False, where: str = "") -> None:
    """A clear error where `attach_written_slots` cannot write a static cache's masks: an attention implementation
    other than STATIC_MASKS', or a sliding window."""
    if sliding or implementation not in STATIC_MASKS:
        raise ConfigError(f"{where}generation after a reduced prefill into a static cache (cg) needs "
                          f"{' or '.join(STATIC_MASKS)} attention, got {implementation}"
                          f"{' with a sliding window' if sliding else ''}; pass cg=False")


def prefill(model, begin, settle) -> list:
    """Hooks on the forwards that start a generation: generate's first forward, the only one of more than one token
    (each decoding step feeds one); and for the whole generation, the masks of a static cache's written slots
    (`attach_written_slots`)."""
    pending = []

    def before(module, args, kwargs):
        input_ids = args[0] if args else kwargs.get("input_ids")
        if input_ids is not None and input_ids.shape[1] > 1:
            pending.append(True)
            begin(input_ids)

    def after(module, args, kwargs, output):
        if pending:
            pending.clear()
            settle()

    return [model.register_forward_pre_hook(before, with_kwargs=True),
            model.register_forward_hook(after, with_kwargs=True), *attach_written_slots(model)]


def prefill_cache(model, input_ids: torch.Tensor) -> tuple[torch.Tensor, object]:
    """The prompt's forward into a fresh cache, as generate prefills: last-position logits and the cache."""
    out = model(input_ids, use_cache=True, logits_to_keep=1)
    return out.logits, out.past_key_values


def kv_cache_bytes(model, cache) -> int:
    """Bytes of the keys and values the attention layers of a prefill's cache hold. transformers' caches grow with
    the tokens each layer saw, so a reduced prefill's attention layers hold only the kept tokens."""
    if hasattr(cache, "layers"):  # DynamicCache: one entry per layer, `keys` / `values` on attention layers
        tensors = [getattr(layer, name, None) for layer in cache.layers for name in ("keys", "values")]
    else:  # the hybrid caches of older releases: per-layer lists, empty tensors on SSM layers
        tensors = [*getattr(cache, "key_cache", []), *getattr(cache, "value_cache", [])]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def generate(model, input_ids: torch.Tensor, max_new_tokens: int, sampling, eos_token_id: int | None,
             cg: bool, reducer=None) -> torch.Tensor:
    """transformers' own `generate`, its prefill reduced where a reducer is given; `cg`: decode into a static cache,
    for which generate compiles its decoding step (on a GPU: CUDA graphs; elsewhere it runs eagerly), else into its
    dynamic cache."""
    if cg and reducer is not None:  # before any work
        check_written_slot_masks(model.config._attn_implementation)
    greedy = sampling.top_k == 1 or sampling.temperature == 0
    options = dict(do_sample=False) if greedy else dict(
        do_sample=True, top_k=sampling.top_k or None, top_p=sampling.top_p or None, min_p=sampling.min_p or None,
        temperature=sampling.temperature)
    if cg:
        options["cache_implementation"] = "static"
    pad = eos_token_id if eos_token_id is not None else model.config.pad_token_id
    with torch.no_grad(), (reducer.prefilling() if reducer is not None else contextlib.nullcontext()):
        return model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                              min_new_tokens=0, eos_token_id=eos_token_id, pad_token_id=pad, **options)

