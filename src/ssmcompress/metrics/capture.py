"""The measured forwards captured in CUDA graphs: one capture per forward and input, replayed for every timed call.

A forward of a small model, or at batch 1, is bound by the host: every kernel is launched from Python, and a
reduction layer adds a string of small kernels and their launches. Replaying a graph launches the whole forward at
once, so what is timed is the GPU's work, as mamba-ssm does for its decoding steps (`mamba_ssm.utils.generation`,
`CUDAGraph`). That needs static shapes: with every row real and unprotected (the efficiency benchmark) the reducer
knows each layer's width from the budget before the forward (Reducer.planned_counts) and reads nothing back from the
GPU during it, so the reduced forward and its ceiling capture as the dense one does. Where a capture fails (an op
that waits for the GPU or copies from the host, a host that builds its masks from data), the forward runs eagerly
and the record says why.

torch's own `torch.cuda.graph` does the capture; written here is only the protocol around it (warm-up on a side
stream, which Triton's autotuning and cuBLAS's workspaces need before a capture, as torch's documentation says, and
the fallback).
"""
from __future__ import annotations

from typing import Callable

import torch

CUDA_GRAPH = "CUDA graph (one capture per forward, replayed)"
EAGER = "eager"
NO_GPU = f"{EAGER} (CUDA graphs need a GPU)"


def graphed(forward: Callable, input_ids: torch.Tensor, warmup: int = 3, pool=None) -> tuple[Callable, str | None]:
    """(a callable that replays a CUDA graph of `forward(input_ids)`, None), or (`forward`, why it could not be
    captured). The replay takes only this `input_ids` (the graph reads its memory) and returns the graph's output
    tensor, overwritten by the next replay. `pool`: a memory pool shared with other graphs (graph_all)."""
    if not input_ids.is_cuda:
        return forward, NO_GPU
    stream = torch.cuda.Stream(input_ids.device)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.no_grad():
            stream.wait_stream(torch.cuda.current_stream(input_ids.device))
            with torch.cuda.stream(stream):
                for _ in range(warmup):
                    forward(input_ids)
            torch.cuda.current_stream(input_ids.device).wait_stream(stream)
            with torch.cuda.graph(graph, pool=pool):
                output = forward(input_ids)
    except Exception as error:  # noqa: BLE001 - any failure to capture means: time it eagerly, and say why
        torch.cuda.synchronize(input_ids.device)
        return forward, f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]

    def replay(ids: torch.Tensor) -> torch.Tensor:
        if ids is not input_ids:
            raise ValueError("a captured forward replays on the input it was captured with")
        graph.replay()
        return output
    replay.graph = graph  # kept alive with the replay: its memory pool holds the forward's activations
    return replay, None


def graph_all(forwards: dict, input_ids: torch.Tensor, settle: dict | None = None) -> tuple[dict, dict]:
    """Each forward captured (`graphed`): (the forwards to time, per forward the path it runs: CUDA_GRAPH, or EAGER
    with the reason). `settle`: per forward name, a function to call after one replay (Reducer.settle_captured: the
    reducer's checks on the replay's values). The graphs share one memory pool: they never run at the same time, and
    what a graph leaves for later (its output, the reducer's captured state) stays allocated, so no other graph
    reuses it; the activations of the forwards are then held once, not once per forward."""
    if not input_ids.is_cuda:
        return dict(forwards), {name: NO_GPU for name in forwards}
    timed, paths = {}, {}
    pool = torch.cuda.graph_pool_handle()
    for name, forward in forwards.items():
        timed[name], failure = graphed(forward, input_ids, pool=pool)
        paths[name] = CUDA_GRAPH if failure is None else f"{EAGER} (capture failed: {failure})"
        if failure is None and settle and name in settle:
            timed[name](input_ids)
            settle[name]()
    return timed, paths
