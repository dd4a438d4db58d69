"""The mamba-ssm host: `MambaLMHeadModel` (Mamba-1, Mamba-2, and hybrids with `MHA` layers at `attn_layer_idx`).

Loading. A source is a hub name (`state-spaces/mamba2-2.7b`) or a local directory in the same format: `config.json`
(a `MambaConfig`) and `pytorch_model.bin`, plus, for our bundled models, the tokenizer files. mamba-ssm is imported
when a model is first built, not when this module is: its import (Triton, transformers) takes seconds, and the config
checks of a run come first, so that bad input is refused quickly (`info_from_config` reads a config dict alone).

Reduction. Nothing of mamba-ssm is copied or replaced:
- layers: `model.backbone.layers`, each a `Block` whose mixer is a Mamba / Mamba2 mixer or an `MHA`;
- the importance signal is the input of the mixer's `out_proj`: the SSM output y (Mamba-1: y·silu(z); Mamba-2: the
  gated RMSNorm of y), or an MHA layer's attention output;
- the fused kernel paths fold `out_proj` in (Mamba-1 `use_fast_path`, Mamba-2 `use_mem_eff_path`): switched off on
  reduction layers only;
- streams: a `Block` returns the paper's two streams itself, `(hidden_states, residual)`: the output of its last
  branch (the mixer, or the MLP where `d_intermediate` > 0) and the running sum it is added to by the next block;
- context: nothing reaches a layer but its input. MHA layers attend causally over the slots they receive, which
  keep the original order, so the kept tokens' causal mask is right; they carry no position signal (rotary MHA is
  refused: flash-attn's rotary embedding would count slots, not original positions).
- generation: mamba-ssm's `decode` with its `InferenceParams`; an MHA layer after a reduction caches fewer keys than
  the prompt had, so during decoding it is given its own offset into its cache (`_cache_offsets`).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import zipfile
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from ssmcompress import architecture, compat, hub, mamba3_reference
from ssmcompress.errors import ConfigError, ModelSourceError
from ssmcompress.hosts import mamba2_dt
from ssmcompress.models import (check_settings, check_tokenizer, load_tokenizer, local_dir, needs_tokenizer,  # noqa: F401
                                resolve_device, resolve_dtype, source_config)

WEIGHTS = "pytorch_model.bin"
CUDA_GRAPHS = True  # its decoding on a GPU replays CUDA graphs (mamba_ssm.utils.generation.decode, cg=True)
FUSED_FLAGS = ("use_fast_path", "use_mem_eff_path")  # mixer flags of fused kernels that skip the mixer's submodules
# a Mamba-3 trap column value whose λ = sigmoid(trap) is exactly 1 in float32: the token's step takes no term of the
# previous token (the trapezoid becomes the step of the token alone; attach_trapezoid)
TRAP_OWN_STEP = 1e4
# mamba-ssm 2.3.2's defaults: MambaConfig (models/config_mamba.py), Mamba2.__init__, Mamba.__init__, MHA.__init__
CONFIG_DEFAULTS = dict(d_model=2560, d_intermediate=0, n_layer=64, vocab_size=50277, pad_vocab_size_multiple=8)
MAMBA2_DEFAULTS = dict(d_state=128, d_conv=4, expand=2, headdim=64, d_ssm=None, ngroups=1, chunk_size=256)
MAMBA1_DEFAULTS = dict(d_state=16, d_conv=4, expand=2, dt_rank="auto")
MAMBA3_DEFAULTS = dict(d_state=128, expand=2, headdim=64, ngroups=1, rope_fraction=0.5, is_outproj_norm=False,
                       is_mimo=False, mimo_rank=4, chunk_size=64)
MAMBA_LAYERS = {"Mamba1": 1, "Mamba2": 2, "Mamba3": 3}
MHA_DEFAULTS = dict(num_heads_kv=None, head_dim=None, mlp_dim=0, rotary_emb_dim=0, causal=False)
GATED_MLP_MULTIPLE = 128  # GatedMLP rounds its hidden width up to this
MHA_MLP_MULTIPLE = 256  # MHA rounds its fused MLP width up to this


def mamba_ssm():
    """mamba-ssm's (MambaConfig, MambaLMHeadModel), importable on any device once compat has routed its kernels."""
    compat.install()
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    return MambaConfig, MambaLMHeadModel


def is_model(model) -> bool:
    return hasattr(model, "backbone") and hasattr(model.backbone, "layers") and hasattr(model, "lm_head")


# ---------------------------------------------------------------------------------------------------- architecture

def mamba_version(config: dict) -> int:
    """1, 2 or 3, from the config's `ssm_cfg.layer` (Mamba1, Mamba2, Mamba3; mamba-ssm's default layer is Mamba1)."""
    layer = (config.get("ssm_cfg") or {}).get("layer", "Mamba1")
    if layer not in MAMBA_LAYERS:
        raise ConfigError(f"unknown ssm_cfg.layer {layer!r}: use one of {', '.join(MAMBA_LAYERS)}")
    return MAMBA_LAYERS[layer]


def padded_vocab(vocab_size: int, multiple: int) -> int:
    return vocab_size + (-vocab_size) % multiple


def round_up(value: int, multiple: int) -> int:
    return math.ceil(value / multiple) * multiple


def info_from_config(config: dict) -> dict:
    """The architecture description (`ssmcompress.architecture`) of a mamba-ssm config dict, by the constructors'
    own formulas (vocabulary padded as MambaLMHeadModel pads it); `model_info` without the parameter count."""
    top = {**CONFIG_DEFAULTS, **{k: v for k, v in config.items() if v is not None}}
    ssm = dict(config.get("ssm_cfg") or {})
    d_model, n_layer = int(top["d_model"]), int(top["n_layer"])
    attention = sorted(int(i) for i in (config.get("attn_layer_idx") or []))
    info = dict(host="mamba", model_type="mamba_ssm", mamba_version=mamba_version(config), d_model=d_model,
                n_layer=n_layer, vocab_size=padded_vocab(int(top["vocab_size"]), int(top["pad_vocab_size_multiple"])))
    if info["mamba_version"] == 2:
        s = {**MAMBA2_DEFAULTS, **ssm}
        d_inner = int(s["expand"] * d_model)
        d_ssm = d_inner if s["d_ssm"] is None else int(s["d_ssm"])
        info.update(d_inner=d_inner, d_state=int(s["d_state"]), d_conv=int(s["d_conv"]),
                    nheads=d_ssm // int(s["headdim"]), headdim=int(s["headdim"]), ngroups=int(s["ngroups"]),
                    chunk_size=int(s["chunk_size"]))
    elif info["mamba_version"] == 3:
        s = {**MAMBA3_DEFAULTS, **ssm}
        d_inner, d_state = int(s["expand"] * d_model), int(s["d_state"])
        rotated = int(d_state * float(s["rope_fraction"]))  # Mamba3.__init__: the rotated state dimensions, even
        info.update(d_inner=d_inner, d_state=d_state, d_conv=0, nheads=d_inner // int(s["headdim"]),
                    headdim=int(s["headdim"]), ngroups=int(s["ngroups"]), chunk_size=int(s["chunk_size"]),
                    n_angles=(rotated - rotated % 2) // 2, outproj_norm=int(bool(s["is_outproj_norm"])))
        if s["is_mimo"]:  # R (k, v) pairs and queries per token; SISO's descriptions stay as they were
            info["mimo_rank"] = int(s["mimo_rank"])
    else:
        s = {**MAMBA1_DEFAULTS, **ssm}
        dt_rank = math.ceil(d_model / 16) if s["dt_rank"] == "auto" else int(s["dt_rank"])
        info.update(d_inner=int(s["expand"] * d_model), d_state=int(s["d_state"]), d_conv=int(s["d_conv"]),
                    dt_rank=dt_rank)
    if attention or int(top["d_intermediate"]):
        if any(not 0 <= i < n_layer for i in attention):
            raise ValueError(f"attn_layer_idx {attention} lies outside the {n_layer} layers")
        info["layers"] = "".join(architecture.ATTENTION if i in attention else architecture.SSM for i in range(n_layer))
        mlp = int(top["d_intermediate"])
        info["ffn"] = (architecture.FFN_GATED if mlp else architecture.FFN_NONE) * n_layer
        if mlp:
            info.update(mlp_size=round_up(mlp, GATED_MLP_MULTIPLE), mlp_gated=1)
    if attention:
        mha = {**MHA_DEFAULTS, **(config.get("attn_cfg") or {})}
        heads = int(mha["num_heads"])
        info.update(attn_heads=heads, attn_kv_heads=int(mha["num_heads_kv"] or heads),
                    attn_head_dim=int(mha["head_dim"] or d_model // heads),
                    attn_extra=round_up(int(mha["mlp_dim"]), MHA_MLP_MULTIPLE), attn_rotary=int(mha["rotary_emb_dim"]))
    return info


def architecture_of(model) -> dict:
    """`info_from_config` of a built model's config."""
    config = model.config
    return info_from_config({k: getattr(config, k) for k in ("d_model", "d_intermediate", "n_layer", "vocab_size",
                                                              "ssm_cfg", "attn_layer_idx", "attn_cfg",
                                                              "pad_vocab_size_multiple")})


def model_info(model) -> dict:
    """The architecture description of a built model, with its parameter count."""
    return dict(architecture_of(model), params=sum(p.numel() for p in model.parameters()))


def described(info: dict) -> bool:
    """Whether the description covers the model's layers (FLOPs, reduction): always, for mamba-ssm models."""
    return True


def check_reduction(info: dict) -> None:
    """What token reduction cannot do on this model: a ConfigError before any work."""
    if architecture.attention_layers(info) and info.get("attn_rotary"):
        raise ConfigError("this mamba-ssm hybrid's MHA layers use rotary embeddings (attn_cfg.rotary_emb_dim), which "
                          "count slots, not original positions: token reduction supports MHA layers without them")


def check_architecture(config: dict) -> dict:
    """info_from_config, with what the FLOPs model relies on checked: causal attention layers."""
    info = info_from_config(config)
    if architecture.attention_layers(info) and not (config.get("attn_cfg") or {}).get("causal", False):
        raise ValueError("attn_cfg.causal must be true: a language model's attention layers are causal")
    return info


# ---------------------------------------------------------------------------------------------------- sources

def load_config(source: str) -> dict:
    """The `MambaConfig` fields of a local directory or hub model, with clear errors for unusable sources."""
    config = source_config(source)
    if "model_type" in config:
        raise ModelSourceError(f"{source!r}: config.json names model_type {config['model_type']!r}, a transformers "
                               f"model: use family: hf (or leave family out to read it from config.json)")
    return config


def check_weights(source: str) -> None:
    """The weights file exists (locally, in the hub cache, or on the hub); reading it is the run's first work."""
    directory = local_dir(source)
    if directory is None:
        hub.require(source, WEIGHTS)
    elif not (directory / WEIGHTS).is_file():
        raise ModelSourceError(f"model directory {source!r} has config.json but no {WEIGHTS}")


def check_config(cfg) -> dict:
    """The `model` section of a mamba-ssm model, before any work: the shared settings, the source's config.json (or
    the config of a random init), its weights and, when the run reads text, its tokenizer. Returns the model's
    config dict."""
    model = check_settings(cfg)
    if model["random_init"]:
        config = model["config"]
    else:
        config = load_config(model["path"])
        check_weights(model["path"])
    try:
        check_architecture(config)
    except (TypeError, ValueError, KeyError) as error:
        raise ModelSourceError(f"model config of {model.get('path')!r} is not a mamba-ssm config: {error}") from None
    if needs_tokenizer(cfg):
        check_tokenizer(model["tokenizer"])
    return config


# ---------------------------------------------------------------------------------------------------- models

def kernel_config(config: dict) -> dict:
    """A copy of a config dict that runs with the kernels available here (compat's flags).

    Mamba-2's default `use_mem_eff_path` fuses conv, scan, norm and out_proj in one kernel that needs the compiled
    causal-conv1d; without it the unfused path runs (Triton scan on a GPU, reference on a CPU), which also calls
    `out_proj` as a module, so that the reducer's importance hooks see its input. Mamba-1's fused path
    (`mamba_inner_fn`) calls both compiled extensions.
    """
    config = dict(config)
    ssm_cfg = dict(config.get("ssm_cfg") or {})
    if mamba_version(config) == 2 and not compat.HAS_CAUSAL_CONV1D:
        ssm_cfg["use_mem_eff_path"] = False
    if mamba_version(config) == 1 and not (compat.HAS_SELECTIVE_SCAN_CUDA and compat.HAS_CAUSAL_CONV1D):
        ssm_cfg["use_fast_path"] = False
    config["ssm_cfg"] = ssm_cfg
    return config


def build_model(config: dict, device: str | torch.device = "cpu", dtype: str | torch.dtype = "auto",
                seed: int | None = 0):
    """A randomly initialised `MambaLMHeadModel` (mamba-ssm's own init, drawn from `seed`) for a config dict."""
    MambaConfig, MambaLMHeadModel = mamba_ssm()
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    fields = {k: v for k, v in kernel_config(config).items() if k in MambaConfig.__dataclass_fields__}
    if seed is not None:
        torch.manual_seed(seed)
    model = MambaLMHeadModel(MambaConfig(**fields), device=device, dtype=dtype)
    return model.eval()


def load_model(source: str, device: str | torch.device = "auto", dtype: str | torch.dtype = "auto",
               random_init: bool = False, config: dict | None = None, seed: int = 0):
    """Load a pretrained model, or build one with random weights drawn from `seed` (`random_init`, from `config`
    if given)."""
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    if random_init:
        return build_model(config if config is not None else load_config(source), device, dtype, seed=seed)
    model_config = load_config(source)
    state = load_state_dict(source)  # before building: a corrupt file fails before any memory is spent
    model = build_model(model_config, device, dtype)
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise ModelSourceError(f"the weights of {source!r} do not fit its config.json: "
                               f"{str(error).splitlines()[1].strip() if len(str(error).splitlines()) > 1 else error}"
                               ) from None
    return model.eval()


def load_state_dict(source: str) -> dict:
    """The weights file of a local directory or hub model (as mamba-ssm's own `load_state_dict_hf` reads it), with a
    one-line error for a truncated or corrupt file."""
    directory = local_dir(source)
    path = directory / WEIGHTS if directory is not None else Path(hub.file(source, WEIGHTS))
    if not path.is_file():
        raise ModelSourceError(f"model directory {source!r} has config.json but no {WEIGHTS}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as error:
        first = (str(error).splitlines() or [type(error).__name__])[0][:160]
        raise ModelSourceError(f"cannot read the weights {path}: the file is truncated or corrupt ({first}); "
                               f"copy or download it again") from None


def save_model(model, directory: str | os.PathLike, tokenizer=None, dtype: torch.dtype | None = None) -> None:
    """Write `config.json` + `pytorch_model.bin` (mamba-ssm's hub format), optionally the tokenizer too."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = dict(model.config.__dict__)
    ssm_cfg = dict(config.get("ssm_cfg") or {})
    ssm_cfg.pop("use_mem_eff_path", None)  # a property of where it runs, not of the model
    ssm_cfg.pop("use_fast_path", None)
    config["ssm_cfg"] = ssm_cfg
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    state, converted = {}, {}  # tied tensors (embedding = lm_head) stay one tensor in the file
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape))
        if key not in converted:
            target = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
            converted[key] = tensor.detach().to("cpu", target).clone()
        state[name] = converted[key]
    torch.save(state, directory / WEIGHTS)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


# ---------------------------------------------------------------------------------------------------- reduction

def logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    """One forward: the logits at every position."""
    return model(input_ids).logits


def layers(model) -> list:
    return list(model.backbone.layers)


def lm_head(model):
    return model.lm_head


def importance_site(model, index: int):
    """The module whose input is the signal the reducer scores: the mixer's (Mamba's or MHA's) `out_proj`."""
    return model.backbone.layers[index].mixer.out_proj


def check_delta(info: dict) -> None:
    """importance=delta: Mamba-1 and Mamba-2 mixers compute Δ where attach_delta reads it."""
    if info["mamba_version"] == 3:
        raise ConfigError("importance=delta reads Mamba-1's and Mamba-2's Δ; Mamba-3's (dd_dt, with its trapezoid "
                          "and rotation) is not wired: use another importance")


def attach_delta(model, index: int, record) -> list:
    """Hooks that hand `record` the SSM's Δ before its softplus, (batch, length, channels), each time layer `index`'s
    mixer computes it: Mamba-1's per channel (dt_proj of x_proj's dt columns, bias included, as the scan adds it),
    Mamba-2's per head (in_proj's dt columns plus dt_bias). The mixer computes it with the weights directly (Mamba-1)
    or inside in_proj's output, so the hook computes it again from the module whose output holds it."""
    mixer = model.backbone.layers[index].mixer
    if hasattr(mixer, "dt_proj"):  # Mamba-1: x_proj takes the (batch·length, d_inner) rows
        batch = {}

        def rows(module, args, kwargs):  # the batch, not the length: the mixer may run padded (compat.aligned_mamba1)
            batch["n"] = (args[0] if args else kwargs["hidden_states"]).shape[0]

        def from_x_proj(module, args, out):
            dt = F.linear(out[..., :mixer.dt_proj.in_features], mixer.dt_proj.weight, mixer.dt_proj.bias)
            record(dt.reshape(batch["n"], -1, dt.shape[-1]))

        return [mixer.register_forward_pre_hook(rows, with_kwargs=True),
                mixer.x_proj.register_forward_hook(from_x_proj)]
    if hasattr(mixer, "dt_bias"):  # Mamba-2: in_proj's last nheads columns are dt
        return [mixer.in_proj.register_forward_hook(
            lambda module, args, out: record(out[..., -mixer.nheads:] + mixer.dt_bias))]
    raise ConfigError(f"layer {index} has no SSM mixer, so no Δ")


def ssm_decay(model, index: int) -> torch.Tensor:
    """A = -exp(A_log) of layer `index`'s SSM: per head (Mamba-2), per channel and state (Mamba-1)."""
    return -torch.exp(model.backbone.layers[index].mixer.A_log.float())


def attach_delta_filter(model, index: int, keep) -> list:
    """Hooks through which `keep(dt)` drops tokens from layer `index`'s Mamba-2 heads (mamba2_dt.attach_filter)."""
    mixer = model.backbone.layers[index].mixer
    return mamba2_dt.attach_filter(mixer, index, "nheads", "dt_limit", keep)


def fused_flags(model, index: int) -> list[tuple[object, str]]:
    mixer = model.backbone.layers[index].mixer
    return [(mixer, flag) for flag in FUSED_FLAGS if hasattr(mixer, flag)]


def attach_streams(model, index: int, reduce) -> list:
    """Layer `index`'s `(hidden_states, residual)` pass through `reduce`, which returns the reduced pair (None:
    unchanged, outside a reducer's calls)."""
    def hook(module, args, output):
        return reduce(*output)

    return [model.backbone.layers[index].register_forward_hook(hook)]


def attach_context(model, first: int, state) -> list:
    """Nothing but the hidden states reaches a mamba-ssm layer (see the module docstring)."""
    return []


def later_mamba3_mixers(model, first: int) -> list:
    """(index, mixer) of every Mamba-3 mixer after layer `first`: those that see the reduced sequence."""
    return [(index, layer.mixer) for index, layer in enumerate(model.backbone.layers)
            if index > first and type(layer.mixer).__name__ == "Mamba3"]


def position_gaps(current, key, rows: int, width: int) -> torch.Tensor:
    """(rows, width): each kept token's original position minus the previous kept token's (the first token's: its
    position + 1), over the rows of the forward that a hook's call on `rows` rows sees (ForwardState.next_rows)."""
    positions = current.positions[current.next_rows(key, rows), :width]
    return torch.diff(positions, dim=1, prepend=torch.full_like(positions[:, :1], -1))


def attach_trapezoid(model, first: int, state) -> list:
    """trapezoid=none: in every Mamba-3 mixer after layer `first`, a kept token whose original predecessor was removed
    (or merged away) takes no neighbour term: its trap column is set so that λ = sigmoid(trap) is 1 (mamba3.py: the
    kernel's λ_t weighs the token's own step, 1 - λ_t the previous token's), the step of the token alone. `state()`
    (the reducer's ForwardState, None outside its calls) gives the kept tokens' original positions."""
    def hook(index, mixer, module, args, out):
        current = state()
        if current is None or not current.counts or out.dim() != 3:  # no removal yet in this forward; a decoding step
            return None
        # (b, n): the original predecessor is not the previous kept token
        gap = position_gaps(current, ("trapezoid", index), int(out.shape[0]), int(out.shape[1])) != 1
        end = out.shape[-1] - mixer.num_rope_angles
        out[..., end - mixer.nheads:end].masked_fill_(gap[..., None], TRAP_OWN_STEP)
        return out

    return [mixer.in_proj.register_forward_hook(partial(hook, index, mixer))
            for index, mixer in later_mamba3_mixers(model, first)]


def attach_rotation(model, first: int, state, rule: str) -> list:
    """rotation=positions | sizes: in every Mamba-3 mixer after layer `first`, each kept token's angle step
    π·tanh(angle)·dt is multiplied by the original tokens it stands for, so that its rotation advances over the tokens
    removed before it as if they had its own step. positions: the original positions from the previous kept token's to
    its own (the rotation follows the original positions, as a transformer's RoPE positions carried by a reducer);
    sizes: the tokens averaged into it in the hidden stream (a merged token's combined step; 1 for a token a method only
    keeps or prunes around). The factors hold during the mixer's forward (mamba3_reference.ANGLE_STEP_SCALE, read on
    both kernel paths). `state()`: the reducer's ForwardState, None outside its calls (decoding steps run dense)."""
    held = {}

    def before(index, module, args, kwargs):
        current = state()
        u = args[0] if args else kwargs["u"]
        if current is None or not current.counts:  # no removal yet in this forward; a decoding step
            return
        if rule == "positions":
            scale = position_gaps(current, ("rotation", index), int(u.shape[0]), int(u.shape[1]))
        else:
            scale = current.hidden_sizes[current.next_rows(("rotation", index), int(u.shape[0])), :u.shape[1]]
        held[index] = mamba3_reference.ANGLE_STEP_SCALE.set(scale.float())

    def after(index, module, args, kwargs, output):
        token = held.pop(index, None)
        if token is not None:
            mamba3_reference.ANGLE_STEP_SCALE.reset(token)

    return [handle for index, mixer in later_mamba3_mixers(model, first)
            for handle in (mixer.register_forward_pre_hook(partial(before, index), with_kwargs=True),
                           mixer.register_forward_hook(partial(after, index), with_kwargs=True, always_call=True))]


def prefill(model, begin, settle) -> list:
    """Hooks on the forwards that start a generation: mamba-ssm's `decode` prefills with `inference_params` at
    offset 0 (its CUDA-graph capture and its decoding steps run at later offsets)."""
    def before(module, args, kwargs):
        params = kwargs.get("inference_params")
        if params is not None and params.seqlen_offset == 0:
            begin(args[0] if args else kwargs["input_ids"])

    def after(module, args, kwargs, output):
        settle()

    return [model.register_forward_pre_hook(before, with_kwargs=True),
            model.register_forward_hook(after, with_kwargs=True)]


def prefill_cache(model, input_ids: torch.Tensor) -> tuple[torch.Tensor, object]:
    """The prompt's forward into a fresh inference cache, as mamba-ssm's decode prefills: last-position logits and
    the cache (InferenceParams)."""
    from mamba_ssm.utils.generation import InferenceParams

    params = InferenceParams(max_seqlen=input_ids.shape[1] + 1, max_batch_size=input_ids.shape[0])
    return model(input_ids, inference_params=params, num_last_tokens=1).logits, params


def kv_cache_bytes(model, cache) -> int:
    """Bytes of the keys and values the attention layers of a prefill's cache hold. mamba-ssm's MHA allocates its
    cache for `max_seqlen` tokens up front (MHA.allocate_inference_cache), so a reduced prefill fills fewer slots
    of the same bytes."""
    attention = set(architecture.attention_layers(architecture_of(model)))
    entries = [cache.key_value_memory_dict[i] for i in attention if i in cache.key_value_memory_dict]
    return sum(kv.numel() * kv.element_size() for kv, *_ in entries)


def generate(model, input_ids: torch.Tensor, max_new_tokens: int, sampling, eos_token_id: int | None,
             cg: bool, reducer=None) -> torch.Tensor:
    """mamba-ssm's own decoding (`mamba_ssm.utils.generation.decode`); with a reducer, its prefill runs reduced."""
    from mamba_ssm.utils.generation import decode

    hybrid = bool(architecture.attention_layers(architecture_of(model)))
    reduced = reducer is not None
    with (reducer.prefilling() if reduced else contextlib.nullcontext()), \
            (_cache_offsets(model, reducer) if reduced and hybrid else contextlib.nullcontext()):
        output = decode(input_ids, model, max_length=input_ids.shape[1] + max_new_tokens, top_k=sampling.top_k,
                        top_p=sampling.top_p, min_p=sampling.min_p, temperature=sampling.temperature,
                        eos_token_id=eos_token_id, cg=cg and not (reduced and hybrid))
    return output.sequences


@contextlib.contextmanager
def _cache_offsets(model, reducer):
    """While decoding after a reduced prefill, each MHA layer sees the offset of its own cache: mamba-ssm writes a new
    token's keys at `inference_params.seqlen_offset` and attends to every slot before it, and a layer after a
    reduction cached only the tokens it saw (the prompt's length minus those removed before it). Its MHA needs no
    position (no rotary: check_reduction), so the offset is the only thing to shift. Decoding runs without CUDA graphs
    here, whose captured offsets could not be shifted."""
    def shift(index, sign, module, args, kwargs):
        params = kwargs.get("inference_params")
        entering = reducer.prefill_entering
        if params is None or params.seqlen_offset == 0 or entering is None:
            return None
        params.seqlen_offset += sign * (entering[0] - entering[index])

    handles = []
    for index, block in enumerate(model.backbone.layers):
        if not hasattr(block.mixer, "num_heads_kv"):  # Mamba mixers: their states do not depend on the offset
            continue
        handles.append(block.register_forward_pre_hook(partial(shift, index, -1), with_kwargs=True))
        handles.append(block.register_forward_hook(
            lambda module, args, kwargs, output, index=index: shift(index, 1, module, args, kwargs), with_kwargs=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
