"""The pruning core's adapter for transformers causal LMs (OPT, the LLaMA family, GPT-2, ...): which linear layers
a decoder block has, and how a block runs on captured inputs (targets.py is the mamba-ssm one; same functions).

Layers: every nn.Linear and transformers Conv1D inside a decoder block, named by its path in the block, as the
official SparseGPT and Wanda drivers name them (`find_layers`): OPT self_attn.{q,k,v,out}_proj, fc1, fc2; LLaMA
self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj; GPT-2 attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj. GPT-2's
Conv1D stores its weight as (in x out); it is read and written here transposed, as SparseGPT's `W.t()`. Inputs are
read with forward pre-hooks on these modules (the official drivers use forward hooks; the input is the same).

Block inputs: the official drivers replace the first decoder layer by a `Catcher` that records its hidden states and
keyword arguments (attention mask; LLaMA also position ids) and reuse those arguments for every layer. Here, during
one forward of the model per calibration batch, forward pre-hooks record every layer's call arguments besides the
hidden states (attention mask, position ids, rotary position embeddings, cache position, ...) and the first layer's
hidden states; the forward stops at the last layer's input. A block then runs exactly as the model would call it, also where
layers get different arguments (models with sliding-window layers), and whatever a transformers version passes.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn

from ssmcompress.hosts.transformers import is_model, transformers_config

# per decoder layer class, the layers that read the same input tensor: pruned in one true-sequential pass (SparseGPT's
# llama.py groups [k, v, q], [o], [up, gate], [down]); any other layer gets a pass of its own, which is always correct
LLAMA_SHARED = [("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj")]
SHARED_INPUTS = {"OPTDecoderLayer": [("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")],
                 "LlamaDecoderLayer": LLAMA_SHARED, "MistralDecoderLayer": LLAMA_SHARED,
                 "Qwen2DecoderLayer": LLAMA_SHARED}


def handles(model) -> bool:
    return is_model(model)


def conv1d():
    """transformers' Conv1D (GPT-2's linear layer). Imported here, not at the top: transformers takes a second to
    import, and every run checks its pruner settings before any heavy import."""
    from transformers.pytorch_utils import Conv1D

    return Conv1D


def _decoder_layers(model) -> tuple[str, nn.ModuleList]:
    """(path, module list) of the decoder layers: the first ModuleList holding num_hidden_layers modules
    (model.decoder.layers in OPT, model.layers in LLaMA, transformer.h in GPT-2)."""
    count = model.config.num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return name, module
    raise ValueError(f"cannot find the {count} decoder layers of this {model.config.model_type} model")


def blocks(model) -> list[nn.Module]:
    return list(_decoder_layers(model)[1])


def block_prefix(model, index: int) -> str:
    return f"{_decoder_layers(model)[0]}.{index}"


def _linears(block) -> dict[str, nn.Module]:
    return {name: module for name, module in block.named_modules() if isinstance(module, (nn.Linear, conv1d()))}


def prunable(block) -> tuple[str, ...]:
    """Every linear layer of the block, in the order the block registers them (forward order, up to layers that
    read the same input, e.g. OPT registers k_proj, v_proj, q_proj)."""
    return tuple(_linears(block))


def kind(block) -> str:
    return f"{type(block).__name__} blocks"


def sequential_groups(block, names: list[str]) -> list[list[str]]:
    """True-sequential passes: consecutive layers that read the same input share a pass, every other layer gets
    its own."""
    shared = {name: group for group in SHARED_INPUTS.get(type(block).__name__, []) for name in group}
    groups: list[list[str]] = []
    for name in names:
        if groups and name in shared and groups[-1][-1] in shared[name]:
            groups[-1].append(name)
        else:
            groups.append([name])
    return groups


def get_weight(block, name: str) -> torch.Tensor:
    """The layer's weight, (out x in)."""
    module = _linears(block)[name]
    return module.weight.T if isinstance(module, conv1d()) else module.weight


def set_weight(block, name: str, weight: torch.Tensor) -> None:
    module = _linears(block)[name]
    module.weight.copy_(weight.T if isinstance(module, conv1d()) else weight)


def observe(block, name: str, record: Callable[[torch.Tensor], None]) -> torch.utils.hooks.RemovableHandle:
    """Call `record(x)` with every input batch the layer multiplies."""
    return _linears(block)[name].register_forward_pre_hook(lambda module, args: record(args[0]))


def observing(block_list):
    """Every layer's input is visible on the ordinary forward path."""
    return contextlib.nullcontext()


class _Captured(Exception):
    """Raised at the last layer's input: everything the blocks need has been recorded."""


def first_inputs(model, tokens: torch.Tensor, batch_size: int) -> list[tuple]:
    """Per calibration batch: (the first layer's hidden states, [(args, kwargs) of each layer's call besides the
    hidden states])."""
    layers = blocks(model)
    device = model.get_input_embeddings().weight.device
    items = []
    for batch in tokens.split(batch_size):
        hidden, calls = [], []

        def record(module, args, kwargs):
            kwargs = dict(kwargs)
            state = args[0] if args else kwargs.pop("hidden_states")
            if not hidden:
                hidden.append(state)
            calls.append((args[1:], kwargs))
            if module is layers[-1]:
                raise _Captured

        handles = [layer.register_forward_pre_hook(record, with_kwargs=True) for layer in layers]
        try:
            model(batch.to(device), use_cache=False)
        except _Captured:
            pass
        finally:
            for handle in handles:
                handle.remove()
        if len(calls) != len(layers):
            raise RuntimeError(f"the forward called {len(calls)} of {len(layers)} decoder layers")
        items.append((hidden[0], calls))
    return items


def run(block, index: int, item: tuple) -> tuple:
    """The block's output hidden states (the next block's input), with the layer calls carried along."""
    hidden, calls = item
    args, kwargs = calls[index]
    out = block(hidden, *args, **kwargs)
    return (out[0] if isinstance(out, tuple) else out), calls


def tail_is_linear(block, names: list[str]) -> bool:
    """Pre-norm blocks end in `residual + down_proj(...)`, but post-norm ones (OPT-350m) do not: the pruned block
    always runs again."""
    return False


def config_widths(model_config: dict) -> tuple[str, dict[str, int]]:
    """(kind, {layer: input width} in block order) from a config dict: one decoder layer built on the meta device
    (no memory, no weights), so that the layers and widths are the model's own."""
    from transformers import AutoModelForCausalLM  # only for transformers models (see conv1d)

    one_layer = {**model_config, "num_hidden_layers": 1}
    if isinstance(model_config.get("layer_types"), list):
        one_layer["layer_types"] = model_config["layer_types"][:1]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(transformers_config(one_layer))
    block = blocks(model)[0]
    return kind(block), {name: get_weight(block, name).shape[1] for name in prunable(block)}
