"""Layer-by-layer pruning with inputs propagated through the already pruned layers (SparseGPT/Wanda protocol), the
same for every model family; the family's adapter (pruning/adapters.py) says what a block holds and how it runs.

The calibration windows are embedded once (the first block's inputs, with whatever else the blocks are called
with); then, block by block, the block's target layers see inputs that came through every earlier (pruned) block.
With `true_sequential` (default) the targets of a block are pruned pass by pass in forward order (Mamba-1: in_proj,
x_proj, dt_proj, out_proj; OPT: q/k/v_proj, out_proj, fc1, fc2), each pass after re-running the block so that its
targets see the outputs of the targets pruned before them (SparseGPT's `--true-sequential`); layers that read the
same input share a pass. Otherwise every target's inputs come from one pass of the unpruned block (SparseGPT's and
Wanda's default). Finally the pruned block is re-run to produce the next block's inputs.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ssmcompress.pruning import adapters
from ssmcompress.pruning.hessian import LayerInputs, relative_output_error
from ssmcompress.pruning.masks import zero_fraction

BlockInputs = list[tuple]  # per calibration batch: (hidden states, what else the block is called with)
PruneLayer = Callable[[torch.Tensor, LayerInputs | None], torch.Tensor]


def embed(model, tokens: torch.Tensor, batch_size: int) -> BlockInputs:
    """The first block's inputs for each calibration batch."""
    return adapters.of_model(model).first_inputs(model, tokens, batch_size)


def run_block(adapter, block, index: int, inputs: BlockInputs) -> BlockInputs:
    return [adapter.run(block, index, item) for item in inputs]


class _Observed(Exception):
    """Raised once the last wanted input of a batch is recorded: the rest of the block's forward is not needed."""


def observe_inputs(adapter, block, index: int, inputs: BlockInputs, names: list[str],
                   finish: bool = False) -> tuple[dict[str, LayerInputs], list | None]:
    """Run the block over the calibration inputs, accumulating each named target's input statistics (`names` in
    forward order). The forward stops once every one has been seen (e.g. right at the mixer's input for in_proj;
    OPT calls q_proj before the k_proj and v_proj it registers first), unless `finish`: then every batch runs to the
    end and the second value holds, per batch, the block's outputs and the last target's input (see
    `outputs_after_linear`)."""
    stats = {}
    for name in names:
        weight = adapter.get_weight(block, name)
        stats[name] = LayerInputs(weight.shape[1], device=weight.device)
    last_inputs, seen = [], set()

    def recorder(name):
        def record(x):
            stats[name].add(x)
            seen.add(name)
            if finish and name == names[-1]:
                last_inputs.append(x)
            if not finish and len(seen) == len(names):
                raise _Observed
        return record

    handles = [adapter.observe(block, name, recorder(name)) for name in names]
    finished = []
    try:
        with adapter.observing([block]):
            for item in inputs:
                seen.clear()
                try:
                    finished.append(adapter.run(block, index, item))
                except _Observed:
                    pass
    finally:
        for handle in handles:
            handle.remove()
    return stats, (list(zip(finished, last_inputs)) if finish else None)


def outputs_after_linear(finished: list, before: torch.Tensor, after: torch.Tensor) -> BlockInputs:
    """The next block's inputs once the block's last linear layer (whose output the block adds to its hidden
    states) went from `before` to `after`: hidden + x (after - before)ᵀ, instead of a second forward pass through
    the block (which halves the calibration time)."""
    delta = (after - before).float()
    return [(hidden + F.linear(x.float(), delta).to(hidden.dtype), *rest) for (hidden, *rest), x in finished]


def prune_linear(adapter, block, name: str, prune_layer: PruneLayer, inputs: LayerInputs | None) -> dict:
    """Replace the layer's weight by its pruned version (in place); the layer's report."""
    before = adapter.get_weight(block, name).detach().clone()
    after = prune_layer(before, inputs)
    if after.shape != before.shape or after.dtype != before.dtype:
        raise RuntimeError(f"a pruner returned {tuple(after.shape)} {after.dtype} for a {tuple(before.shape)} "
                           f"{before.dtype} weight")
    adapter.set_weight(block, name, after)
    zeros = int((after == 0).sum().item())
    return dict(sparsity=zero_fraction(after), zeros=zeros, params=after.numel(),
                error=None if inputs is None else relative_output_error(before, after, inputs.gram))


def target_order(model, target_names) -> list[str]:
    """The chosen targets in the blocks' forward order (ValueError for a name the blocks do not have)."""
    adapter = adapters.of_model(model)
    block = adapter.blocks(model)[0]
    return adapters.in_order(target_names, adapter.prunable(block), adapter.kind(block))


@torch.no_grad()
def prune_model(model, prune_layer: PruneLayer, target_names, tokens: torch.Tensor | None = None,
                true_sequential: bool = True, batch_size: int = 8, desc: str = "prune") -> dict[str, dict]:
    """Prune the target layers of every block in place; {module name: report}.

    `prune_layer(weight, inputs)` returns the pruned weight (out x in); `inputs` is None when `tokens` is None
    (pruners that need no calibration data, e.g. magnitude).
    """
    adapter = adapters.of_model(model)
    blocks = adapter.blocks(model)
    names = target_order(model, target_names)
    reports = {}
    inputs = embed(model, tokens, batch_size) if tokens is not None else None
    for index, block in enumerate(tqdm(blocks, desc=desc, unit="block")):
        groups = adapter.sequential_groups(block, names) if true_sequential else [names]
        prefix = adapter.block_prefix(model, index)
        next_inputs = None
        for group in groups:
            finish = inputs is not None and group is groups[-1] and adapter.tail_is_linear(block, group)
            stats, finished = observe_inputs(adapter, block, index, inputs, group, finish) \
                if inputs is not None else ({}, None)
            for name in group:
                before = adapter.get_weight(block, name).detach().clone() if finish else None
                reports[f"{prefix}.{name}"] = prune_linear(adapter, block, name, prune_layer, stats.get(name))
            if finish:
                next_inputs = outputs_after_linear(finished, before, adapter.get_weight(block, group[-1]))
        if inputs is not None:
            inputs = next_inputs if next_inputs is not None else run_block(adapter, block, index, inputs)
    return reports
