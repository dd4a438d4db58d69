"""Timing spans of work on the stream a tensor lives on (a leaf: the reducer times its own work with it, the
metrics read it)."""
from __future__ import annotations

import time

import torch
from torch import Tensor


class Stopwatch:
    """Sums the time spent inside `timed` blocks: CUDA events on a GPU (recorded in stream order, so no
    synchronisation is added; the host waits the timed work itself does, e.g. for a data-dependent width, show up
    as the stream idling between the events), `time.perf_counter` on a CPU. `seconds()` waits for the events."""

    def __init__(self):
        self.spans: list[tuple] = []

    def seconds(self) -> float:
        total = 0.0
        for start, end in self.spans:
            if isinstance(start, float):
                total += end - start
            else:
                end.synchronize()
                total += start.elapsed_time(end) / 1000.0
        return total


class timed:
    """`with timed(stopwatch, like):` adds the block's span to `stopwatch` (nothing when it is None), on the
    device of tensor `like`."""

    def __init__(self, stopwatch: Stopwatch | None, like: Tensor):
        self.stopwatch, self.cuda = stopwatch, like.is_cuda

    def _stamp(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def __enter__(self):
        if self.stopwatch is not None:
            self.start = self._stamp()

    def __exit__(self, *exc):
        if self.stopwatch is not None:
            self.stopwatch.spans.append((self.start, self._stamp()))
        return False
