"""LongMamba's token filtering (Ye et al., "LongMamba: Enhancing Mamba's Long-Context Capabilities via Training-Free
Receptive Field Enlargement", ICLR 2025; github.com/GATECH-EIC/LongMamba, its default `dt_thre` method), written
from the paper and the authors' code, which carries no license: nothing of it is copied here.

It removes no token and saves no FLOPs. In the Mamba-2 heads whose memory spans the whole training context ("global"
heads: the product of their decays over a training-length window exceeds `channel_threshold`), a token whose Δ is at
or below a per-head threshold gets Δ = 0, so it neither enters that head's state nor decays it: on an input longer
than the model was trained on, a global head then accumulates about the Δ mass it saw on training-length inputs.

The thresholds come from a calibration (`calibrate`) on `samples` windows of the training length (`window`): per
window and head, Δ clamped from above at its `clamp_top` quantile (`clamp_top`) gives the decay product
exp(A · ΣΔ) (`decay_product`) and the total ΣΔ; for each target length longer than the window, the window's sorted
clamped Δ stretched linearly to that length gives the value at which the kept Δ first sums past the total
(`thresholds`). Both are averaged (or maxed, `aggregate`) over the windows. At run time a row of n tokens takes the
thresholds of the calibrated length nearest n, times `scale`, in its global heads, once n >= `min_length`.

Deliberate differences from the authors' code, each where it happens: the filter reads each row's own length (theirs:
the batch's length; the same at batch 1, the only batch their evaluation runs); the target lengths are theirs scaled
by window / 2000 (theirs are for 2000-token windows); `min_length` defaults to 1.5 windows (their 3000 tokens at
2000); a threshold rank past the stretched window is clamped to its last value (theirs would index out of range).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

AUTHORS_WINDOW = 2000  # tokens: the authors' calibration windows; their target lengths are for it
AUTHORS_TARGETS = (1e3, 2e3, 3e3, 4e3, 5e3, 6e3, 7e3, 8e3, 10e3, 12e3, 14e3, 16e3, 20e3, 24e3, 30e3, 36e3, 44e3,
                   54e3, 64e3, 80e3, 96e3, 120e3, 144e3, 168e3, 192e3)
AGGREGATES = ("avg", "max")
KEEP_ALL = -1.0  # a threshold below every Δ (Δ >= 0): the head keeps every token


@dataclass(frozen=True)
class Calibration:
    """What `calibrate` found, per filtered layer (in `layers` order) and head."""

    layers: tuple[int, ...]
    window: int  # tokens per calibration window (the model's training length)
    lengths: tuple[int, ...]  # the target lengths, ascending
    decay_product: Tensor  # (layers, heads) float32: exp(A · ΣΔ) over a window, aggregated
    thresholds: Tensor  # (layers, lengths, heads) float32: Δ at or below it is dropped at that length, aggregated


def target_lengths(window: int) -> tuple[int, ...]:
    """The authors' target lengths, scaled from their 2000-token windows to `window`."""
    return tuple(int(round(length * window / AUTHORS_WINDOW)) for length in AUTHORS_TARGETS)


def clamp_top(delta: Tensor, share: float) -> Tensor:
    """(heads, length) Δ clamped from above at each head's k-th largest value, k = max(1, int(length · share))."""
    k = max(1, int(delta.shape[-1] * share))
    return torch.minimum(delta, delta.topk(k, dim=-1).values.min(-1, keepdim=True).values)


def decay_product(delta: Tensor, A: Tensor) -> Tensor:
    """(heads,): how much of a window's first token a head still holds at its end, exp(A · ΣΔ)."""
    return torch.exp((delta * A[:, None]).sum(-1))


def thresholds(delta: Tensor, lengths: tuple[int, ...], window: int) -> Tensor:
    """(len(lengths), heads): per target length, the Δ at or below which a head drops a token, from one window's
    clamped Δ (heads, window): the window's Δ sorted and stretched linearly to the length; the first rank at which
    their running sum passes the window's total, plus one, gives the value (0, keep all, at lengths <= window)."""
    total = delta.sum(-1)
    ranked = delta.sort(-1, descending=True).values[:, None]  # (heads, 1, window)
    rows = []
    for length in lengths:
        if length <= window:
            rows.append(torch.zeros_like(total))
            continue
        stretched = F.interpolate(ranked, size=length, mode="linear", align_corners=False)[:, 0]
        rank = (stretched.cumsum(-1) > total[:, None]).int().argmax(-1) + 1
        rows.append(stretched.gather(1, rank.clamp(max=length - 1)[:, None])[:, 0])
    return torch.stack(rows)


def aggregate(values: list[Tensor], how: str) -> Tensor:
    """The windows' values combined: their mean (`avg`) or elementwise maximum (`max`)."""
    stacked = torch.stack(values)
    return stacked.mean(0) if how == "avg" else stacked.amax(0)


def nearest_length(lengths: tuple[int, ...], n: int) -> int:
    """The index of the calibrated length nearest n (ties: the shorter, as the authors' `min` over their list)."""
    return min(range(len(lengths)), key=lambda i: abs(n - lengths[i]))


def row_thresholds(calibration: Calibration, rows: list[int], channel_threshold: float, scale: float,
                   min_length: int) -> Tensor:
    """(rows, layers, heads): each row's threshold per filtered layer and head, from its length: the nearest
    calibrated length's, times `scale`, in the global heads of rows of at least `min_length` tokens; KEEP_ALL
    elsewhere."""
    glob = calibration.decay_product > channel_threshold  # (layers, heads)
    keep_all = torch.full_like(calibration.decay_product, KEEP_ALL)
    table = []
    for n in rows:
        if n < min_length:
            table.append(keep_all)
            continue
        at = calibration.thresholds[:, nearest_length(calibration.lengths, n)] * scale
        table.append(torch.where(glob, at, keep_all))
    return torch.stack(table)


def keep_mask(delta: Tensor, limits: Tensor) -> Tensor:
    """(batch, length, heads): the tokens a head keeps, Δ (after its softplus) above the row's threshold (limits:
    (batch, heads), from row_thresholds)."""
    return delta > limits[:, None, :]


def window_statistics(delta: Tensor, A: Tensor, share: float, lengths: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """One window's (decay product (heads,), thresholds (lengths, heads)) from its Δ (heads, window)."""
    clamped = clamp_top(delta.float(), share)
    return decay_product(clamped, A.float()), thresholds(clamped, lengths, delta.shape[-1])


@torch.no_grad()
def calibrate(model, host, windows: Tensor, layers: list[int], share: float, how: str,
              batch_size: int = 8) -> Calibration:
    """Run the model over `windows` (samples, window) of token ids and collect every filtered layer's statistics
    (the authors run one window per forward; a window's Δ does not depend on the others in its batch)."""
    captured = {index: [] for index in layers}
    handles = [handle for index in layers for handle in host.attach_delta(
        model, index, lambda dt, index=index: captured[index].append(F.softplus(dt.float()).cpu()))]
    try:
        for start in range(0, windows.shape[0], batch_size):
            host.logits(model, windows[start:start + batch_size])
    finally:
        for handle in handles:
            handle.remove()
    window = int(windows.shape[1])
    lengths = target_lengths(window)
    products, limits = [], []
    for index in layers:
        A = host.ssm_decay(model, index).float().cpu()
        per_window = [window_statistics(delta.T, A, share, lengths) for delta in torch.cat(captured[index])]
        products.append(aggregate([p for p, _ in per_window], how))
        limits.append(aggregate([t for _, t in per_window], how))
    return Calibration(tuple(layers), window, lengths, torch.stack(products), torch.stack(limits))
