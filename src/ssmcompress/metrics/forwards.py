"""The forwards that are measured (dense; reduced, for a reducer and for its ceiling) and how many tokens each of
their layers processes."""
from __future__ import annotations

import torch

from ssmcompress import hosts


def dense_forward(model):
    """The unreduced model: input_ids -> logits at every position. Refuses to run if something (a reducer's
    hooks left active outside its own calls) shortens the sequence, so a dense number is never a reduced one."""
    host = hosts.of_model(model)

    def forward(input_ids: torch.Tensor) -> torch.Tensor:
        logits = host.logits(model, input_ids)
        if logits.shape[1] != input_ids.shape[1]:
            raise RuntimeError("the dense forward returned fewer positions than it was given: the reducer keeps "
                               "modifying the model outside reducer(...) calls, so dense FLOPs/latency cannot be "
                               "measured in the same process")
        return logits
    return forward


def reduced_forward(reducer):
    """The token-reduced model (reduction contract: `reducer(input_ids).logits`), as in the `paper` protocol:
    no protected positions, every row treated as real tokens."""
    def forward(input_ids: torch.Tensor) -> torch.Tensor:
        return reducer(input_ids).logits
    return forward


def tokens_per_layer(model, forward, input_ids: torch.Tensor) -> tuple[list[int], int]:
    """Tokens per sequence entering each block of `model`, and positions reaching the lm_head, during
    `forward(input_ids)` (forward pre-hooks; a reducer keeps the batch rectangular, so one count per layer)."""
    host = hosts.of_model(model)
    layers = host.layers(model)
    seen: dict[int, int] = {}
    hooks = [layer.register_forward_pre_hook(_recorder(seen, i), with_kwargs=True) for i, layer in enumerate(layers)]
    hooks.append(host.lm_head(model).register_forward_pre_hook(_recorder(seen, len(layers)), with_kwargs=True))
    try:
        with torch.no_grad():
            forward(input_ids)
    finally:
        for hook in hooks:
            hook.remove()
    missing = [i for i in range(len(layers) + 1) if i not in seen]
    if missing:
        raise RuntimeError(f"the forward did not run blocks/lm_head {missing}; cannot count their tokens")
    return [seen[i] for i in range(len(layers))], seen[len(layers)]


def _recorder(seen: dict, index: int):
    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.dim() != 3:
            raise RuntimeError(f"expected (batch, tokens, width) entering layer {index}, got {tuple(hidden.shape)}")
        seen[index] = hidden.shape[1]
    return hook
