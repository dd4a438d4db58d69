"""Running every block's mixer on a few rows of the batch at a time: the same outputs, a fraction of the memory.

A block's mixer holds, at full length, several times the residual stream's bytes at once (Mamba-2 at 2.7b,
96 x 2048 tokens: the in_proj output, the convolved x/B/C, the SSD chunk states in float32, y and its gated
norm, about 12 GiB beside 5 GiB of weights). Where a token reduction starts at a later layer, the blocks before
it run at full length for every budget, so that working memory, not the logits, sets the reduced model's peak.
Each row's mixer output depends on that row alone, so running the mixer on `rows` rows at a time and
concatenating gives the same sequence (up to the kernels' choice of algorithm for another batch size) with the
working memory of `rows` rows; the residual stream, the norms, a reducer's work and the head still see the
whole batch. mamba-ssm has no such option (its `Block` calls the mixer once), so it is a wrapper here.

Calls with a cached state (`inference_params`: generation) or packed sequences (`seq_idx`, `cu_seqlens`) run
as they are. A reducer's importance capture on `out_proj` then sees one slice per call; it collects the slices
in order (`reduction.patch`).
"""
from __future__ import annotations

import contextlib

import torch


def sliced_forward(forward, rows: int):
    """`forward` (a mixer's) run on at most `rows` rows at a time, the outputs written in row order into one tensor
    (no list of slices held beside it, as torch.cat would)."""
    def run(hidden_states: torch.Tensor, *args, **kwargs):
        plain = not args and all(value is None for value in kwargs.values())
        if not plain or hidden_states.shape[0] <= rows:
            return forward(hidden_states, *args, **kwargs)
        out = None
        for start in range(0, hidden_states.shape[0], rows):
            part = forward(hidden_states[start:start + rows], **kwargs)
            if out is None:
                out = part.new_empty((hidden_states.shape[0], *part.shape[1:]))
            out[start:start + rows] = part
        return out
    return run


@contextlib.contextmanager
def batch_slices(model, rows: int):
    """While active, every block mixer of a mamba-ssm model runs on at most `rows` rows at a time."""
    if int(rows) < 1:
        raise ValueError(f"mixer rows must be at least 1, got {rows}")
    mixers = [block.mixer for block in model.backbone.layers]
    if any("forward" in vars(mixer) for mixer in mixers):
        raise RuntimeError("a mixer's forward is already replaced (nested batch_slices?)")
    for mixer in mixers:
        mixer.forward = sliced_forward(mixer.forward, int(rows))
    try:
        yield model
    finally:
        for mixer in mixers:
            del mixer.forward  # the class's forward again
