"""The pruning core's adapter for mamba-ssm models: the linear layers of a Mamba / Mamba-2 mixer that can be
pruned, how their inputs are observed, and how a block runs on captured inputs (hf_targets.py is the transformers
one; both have the same functions, see sequential.py).

Forward hooks on the nn.Linear modules are not enough: Mamba-1 applies `in_proj` and `dt_proj` as raw
`weight @ x` matmuls, and the fused paths (Mamba-1 `use_fast_path`, Mamba-2 `use_mem_eff_path`) hand
`out_proj.weight` to a kernel. So each target's input is read where it is certain to exist:
- in_proj: the mixer's own input (a pre-hook on the mixer);
- x_proj (Mamba-1): its module input (called as a module on the unfused path);
- dt_proj (Mamba-1): the first dt_rank columns of x_proj's output, which is exactly what `dt_proj.weight @` gets;
- out_proj: its module input on the unfused path.
During calibration the fused paths are switched off (`unfused`), which changes no result, only the kernels.
A block's calibration inputs are `(hidden_states, residual)` per batch, as MixerModel.forward hands them on.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch
from torch import nn

from ssmcompress import compat, hosts

# forward order inside a mixer: with true-sequential pruning a target sees the already pruned earlier ones
TARGETS = {1: ("in_proj", "x_proj", "dt_proj", "out_proj"), 2: ("in_proj", "out_proj")}


def _mamba_classes():

    compat.install()  # mamba-ssm imports its CUDA extension unconditionally
    from mamba_ssm.modules.mamba2 import Mamba2
    from mamba_ssm.modules.mamba_simple import Mamba

    return Mamba, Mamba2


def mamba_version(mixer: nn.Module) -> int:
    _, Mamba2 = _mamba_classes()

    return 2 if isinstance(mixer, Mamba2) else 1


def mixers(model) -> list[nn.Module]:
    return [block.mixer for block in model.backbone.layers]


def observe_mixer(mixer: nn.Module, target: str,
                  record: Callable[[torch.Tensor], None]) -> torch.utils.hooks.RemovableHandle:
    """Call `record(x)` with every input batch the target layer multiplies during a forward (see module doc)."""
    if target == "in_proj":
        return mixer.register_forward_pre_hook(lambda module, args: record(args[0]))
    if target in ("x_proj", "out_proj"):
        return getattr(mixer, target).register_forward_pre_hook(lambda module, args: record(args[0]))
    if target == "dt_proj":
        return mixer.x_proj.register_forward_hook(lambda module, args, out: record(out[..., :mixer.dt_rank]))
    raise ValueError(f"unknown pruning target {target!r}")


@contextmanager
def unfused(mixer_list):
    """Take the unfused forward path (where every target's input is visible) for the duration."""
    saved = [(mixer, flag, getattr(mixer, flag)) for mixer in mixer_list for flag in hosts.mamba_ssm.FUSED_FLAGS
             if hasattr(mixer, flag)]
    try:
        for mixer, flag, _ in saved:
            setattr(mixer, flag, False)
        yield
    finally:
        for mixer, flag, value in saved:
            setattr(mixer, flag, value)


def input_widths(model_config: dict) -> dict[str, int]:
    """{target: input width} from a config dict (config.json), before any model is built (the mamba-ssm host's
    architecture description)."""
    info = hosts.mamba_ssm.info_from_config(model_config)
    if info["mamba_version"] == 2:
        return {"in_proj": info["d_model"], "out_proj": info["d_inner"]}
    return {"in_proj": info["d_model"], "x_proj": info["d_inner"], "dt_proj": info["dt_rank"],
            "out_proj": info["d_inner"]}


# ------------------------------------------------------------------------------------ the pruning core's adapter


def blocks(model) -> list[nn.Module]:
    return list(model.backbone.layers)


def block_prefix(model, index: int) -> str:
    return f"backbone.layers.{index}.mixer"


def prunable(block) -> tuple[str, ...]:
    """Every target of the block's mixer, in forward order."""
    return TARGETS[mamba_version(block.mixer)]


def kind(block) -> str:
    return f"Mamba-{mamba_version(block.mixer)} mixers"


def sequential_groups(block, names: list[str]) -> list[list[str]]:
    """True-sequential passes: each target reads the output of the one before it, so one target per pass."""
    return [[name] for name in names]


def get_weight(block, name: str) -> torch.Tensor:
    """The target's weight, (out x in)."""
    return getattr(block.mixer, name).weight


def set_weight(block, name: str, weight: torch.Tensor) -> None:
    getattr(block.mixer, name).weight.copy_(weight)


def observe(block, name: str, record: Callable[[torch.Tensor], None]) -> torch.utils.hooks.RemovableHandle:
    return observe_mixer(block.mixer, name, record)


def observing(block_list):
    """The forward path on which every target's input is visible."""
    return unfused([block.mixer for block in block_list])


def first_inputs(model, tokens: torch.Tensor, batch_size: int) -> list[tuple]:
    """The first block's inputs (hidden_states, residual) for each calibration batch, as MixerModel.forward."""
    device = model.backbone.embedding.weight.device
    return [(model.backbone.embedding(batch.to(device)), None) for batch in tokens.split(batch_size)]


def run(block, index: int, item: tuple) -> tuple:
    """The block's outputs (hidden_states, residual): the next block's inputs."""
    hidden, residual = item
    return block(hidden, residual)


def tail_is_linear(block, names: list[str]) -> bool:
    """Whether pruning `names` after observing them changes the block's output by a linear correction: out_proj
    alone (nothing before it changes after the pass), and the block's output is the mixer's out_proj output
    (Mamba and Mamba-2 blocks without an MLP)."""
    return names == ["out_proj"] and getattr(block, "mlp", None) is None


def config_widths(model_config: dict) -> tuple[str, dict[str, int]]:
    """(kind, {target: input width} in forward order) from a config dict, before any model is built."""
    if model_config.get("attn_layer_idx"):
        raise ValueError("hybrid models with attention layers are not supported by the pruners")
    version = hosts.mamba_ssm.mamba_version(model_config)
    widths = input_widths(model_config)
    return f"Mamba-{version} mixers", {name: widths[name] for name in TARGETS[version]}
