"""A small token reducer that follows the reduction contract (ssmcompress.reduction), for testing the evaluation
backend and the measurements without depending on a real method.

After block `layer` it removes `count` positions per row from both streams (hidden state and residual), so every
later block, the final norm and the lm_head process fewer tokens. Which positions: odd positions 1, 3, 5, ... that
are real (< the row's length) and not protected, in that order; a row without enough of them gives up padding
positions from its end instead. With `match=True` it also computes a ToMe-style similarity matrix between the two
alternating halves (cost only, the choice stays positional) and reports that work through `reduction_flops`.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

from ssmcompress import flops


class DropTokens:
    def __init__(self, model, layer: int, count: int, match: bool = False, persistent: bool = False):
        self.model, self.layer, self.count, self.match = model, layer, count, match
        self._state: dict = {}
        block = model.backbone.layers[layer]
        # persistent=True models a reducer that leaves its hook active outside its own calls
        self._handle = block.register_forward_hook(self._hook) if persistent else None
        self.calls = 0

    def __call__(self, input_ids, lengths=None, protect=None):
        self.calls += 1
        self._state = dict(lengths=lengths, protect=protect)
        handle = None if self._handle is not None else self.model.backbone.layers[self.layer].register_forward_hook(
            self._hook)
        try:
            logits = self.model(input_ids).logits
        finally:
            if handle is not None:
                handle.remove()
        positions = self._state.get("positions")
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand(input_ids.shape[0], -1)
        return SimpleNamespace(logits=logits, positions=positions)

    def describe(self) -> dict:
        return dict(method="drop-test", layer=self.layer, count=self.count)

    def reduction_flops(self, tokens_per_layer) -> float:
        return flops.bipartite_matching_flops(tokens_per_layer[self.layer], self.model.config.d_model) \
            if self.match else 0.0

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _hook(self, module, args, output):
        hidden, residual = output
        if self.match:
            normed = hidden / hidden.norm(dim=-1, keepdim=True)
            _ = normed[:, ::2] @ normed[:, 1::2].transpose(1, 2)
        if self.count == 0:
            return output
        keep = kept_positions(hidden.shape[0], hidden.shape[1], self.count, self._state.get("lengths"),
                              self._state.get("protect"), hidden.device)
        self._state["positions"] = keep
        index = keep[..., None]
        return (hidden.gather(1, index.expand(-1, -1, hidden.shape[-1])),
                residual.gather(1, index.expand(-1, -1, residual.shape[-1])))


def kept_positions(batch: int, length: int, count: int, lengths, protect, device) -> torch.Tensor:
    rows = []
    for i in range(batch):
        real = length if lengths is None else int(lengths[i])
        protected = set() if protect is None else set(protect[i].nonzero().flatten().tolist())
        drop = [p for p in range(1, real, 2) if p not in protected][:count]
        padding = [p for p in range(length - 1, real - 1, -1) if p not in protected]
        drop += padding[: count - len(drop)]
        if len(drop) < count:
            raise ValueError(f"row {i} has fewer than {count} removable positions")
        rows.append([p for p in range(length) if p not in set(drop)])
    return torch.tensor(rows, dtype=torch.long, device=device)
