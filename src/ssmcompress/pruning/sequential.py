"""Layer-by-layer pruning with inputs propagated through the already pruned layers (SparseGPT/Wanda protocol).

The calibration windows are embedded once; then, block by block, the block's target layers see inputs that
came through every earlier (pruned) block. With `true_sequential` (default) the targets of a block are pruned one
at a time in forward order (in_proj, x_proj, dt_proj, out_proj), each after re-running the block so that it sees
the outputs of the targets pruned before it (SparseGPT's `--true-sequential`); otherwise every target's inputs
come from one pass of the unpruned block (SparseGPT's and Wanda's default). Finally the pruned block is re-run to
produce the next block's inputs.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ssmcompress.pruning import targets as targets_lib
from ssmcompress.pruning.hessian import LayerInputs, relative_output_error
from ssmcompress.pruning.masks import zero_fraction

BlockInputs = list[tuple[torch.Tensor, torch.Tensor | None]]
PruneLayer = Callable[[torch.Tensor, LayerInputs | None], torch.Tensor]


def embed(model, tokens: torch.Tensor, batch_size: int) -> BlockInputs:
    """The first block's inputs (hidden_states, residual) for each calibration batch, as MixerModel.forward."""
    device = model.backbone.embedding.weight.device
    return [(model.backbone.embedding(batch.to(device)), None) for batch in tokens.split(batch_size)]


def run_block(block, inputs: BlockInputs) -> BlockInputs:
    return [block(hidden, residual) for hidden, residual in inputs]


class _Observed(Exception):
    """Raised once the last wanted input of a batch is recorded: the rest of the block's forward is not needed."""


def observe_inputs(block, inputs: BlockInputs, names: list[str],
                   finish: bool = False) -> tuple[dict[str, LayerInputs], list | None]:
    """Run the block over the calibration inputs, accumulating each named target's input statistics (`names` in
    forward order). The forward stops after the last one (e.g. right at the mixer's input for in_proj), unless
    `finish`: then every batch runs to the end and the second value holds, per batch, the block's outputs and the
    last target's input (see `outputs_after_out_proj`)."""
    mixer = block.mixer
    stats = {name: LayerInputs(getattr(mixer, name).in_features, device=getattr(mixer, name).weight.device)
             for name in names}
    last_inputs = []

    def recorder(name):
        def record(x):
            stats[name].add(x)
            if name == names[-1]:
                if not finish:
                    raise _Observed
                last_inputs.append(x)
        return record

    handles = [targets_lib.observe(mixer, name, recorder(name)) for name in names]
    finished = []
    try:
        with targets_lib.unfused([mixer]):
            for hidden, residual in inputs:
                try:
                    finished.append(block(hidden, residual))
                except _Observed:
                    pass
    finally:
        for handle in handles:
            handle.remove()
    return stats, (list(zip(finished, last_inputs)) if finish else None)


def only_out_proj_changes(block, names: list[str]) -> bool:
    """Whether pruning `names` after observing them changes the block's output by a linear correction: out_proj
    alone (nothing before it changes after the pass), and the block's output is the mixer's out_proj output
    (Mamba and Mamba-2 blocks without an MLP)."""
    return names == ["out_proj"] and getattr(block, "mlp", None) is None


def outputs_after_out_proj(finished: list, before: torch.Tensor, after: torch.Tensor) -> BlockInputs:
    """The next block's inputs once out_proj's weight went from `before` to `after`: hidden + x (after - before)ᵀ,
    instead of a second forward pass through the block (which halves the calibration time)."""
    delta = (after - before).float()
    return [(hidden + F.linear(x.float(), delta).to(hidden.dtype), residual)
            for (hidden, residual), x in finished]


def prune_linear(linear, prune_layer: PruneLayer, inputs: LayerInputs | None) -> dict:
    """Replace the layer's weight by its pruned version (in place); the layer's report."""
    before = linear.weight.detach().clone()
    after = prune_layer(before, inputs)
    if after.shape != before.shape or after.dtype != before.dtype:
        raise RuntimeError(f"a pruner returned {tuple(after.shape)} {after.dtype} for a {tuple(before.shape)} "
                           f"{before.dtype} weight")
    linear.weight.copy_(after)
    zeros = int((after == 0).sum().item())
    return dict(sparsity=zero_fraction(after), zeros=zeros, params=after.numel(),
                error=None if inputs is None else relative_output_error(before, after, inputs.gram))


@torch.no_grad()
def prune_model(model, prune_layer: PruneLayer, target_names, tokens: torch.Tensor | None = None,
                true_sequential: bool = True, batch_size: int = 8, desc: str = "prune") -> dict[str, dict]:
    """Prune the target layers of every block in place; {module name: report}.

    `prune_layer(weight, inputs)` returns the pruned weight; `inputs` is None when `tokens` is None (pruners
    that need no calibration data, e.g. magnitude).
    """
    blocks = model.backbone.layers
    names = targets_lib.in_order(target_names, targets_lib.generation(blocks[0].mixer))
    reports = {}
    inputs = embed(model, tokens, batch_size) if tokens is not None else None
    for index, block in enumerate(tqdm(blocks, desc=desc, unit="block")):
        groups = [[name] for name in names] if true_sequential else [names]
        next_inputs = None
        for group in groups:
            finish = inputs is not None and group is groups[-1] and only_out_proj_changes(block, group)
            stats, finished = observe_inputs(block, inputs, group, finish) if inputs is not None else ({}, None)
            for name in group:
                before = getattr(block.mixer, name).weight.detach().clone() if finish else None
                reports[f"backbone.layers.{index}.mixer.{name}"] = prune_linear(
                    getattr(block.mixer, name), prune_layer, stats.get(name))
            if finish:
                next_inputs = outputs_after_out_proj(finished, before, block.mixer.out_proj.weight)
        if inputs is not None:
            inputs = next_inputs if next_inputs is not None else run_block(block, inputs)
    return reports
