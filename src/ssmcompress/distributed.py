"""The processes of a data-parallel launch (`accelerate launch`, torchrun): how many, which one this is, and the few
exchanges between them that an evaluation needs. Without a launch there is one process and every function is trivial.

The process group is accelerate's, as lm-eval's backends use it: `start` initialises it once per process (gloo where
the model is on a CPU, NCCL on GPUs), and lm-eval's own Accelerator then joins it.
"""
from __future__ import annotations

import os

import torch

from ssmcompress import gpu_pool


def world_size() -> int:
    """The processes of the launch (WORLD_SIZE, set by accelerate launch and torchrun); 1 without one."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def start(device: torch.device) -> None:
    """This process's place in the launch's process group, for a model on `device`."""
    if world_size() > 1:
        from accelerate import PartialState

        PartialState(cpu=device.type == "cpu")


def device(requested: str) -> str:
    """The device a model of this process goes to: under a launch on GPUs, this process's own (LOCAL_RANK), as
    lm-eval's hf backend places it; in a sweep that runs a job per GPU (gpu_pool), the GPU its worker holds;
    otherwise the one requested."""
    if str(requested) not in ("auto", "cuda") or not torch.cuda.is_available():
        return requested
    if world_size() > 1:
        return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    if gpu_pool.pooled():
        return gpu_pool.device()
    return requested


def broadcast(value):
    """Rank 0's `value`, in every process."""
    if world_size() == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def gather(value) -> list | None:
    """Every process's `value`, in rank order, on rank 0 (None on the others)."""
    if world_size() == 1:
        return [value]
    gathered = [None] * world_size() if is_main() else None
    torch.distributed.gather_object(value, gathered, dst=0)
    return gathered
