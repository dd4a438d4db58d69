"""One GPU per job when a sweep runs its jobs side by side on one machine without SLURM (`hydra/launcher=gpus`:
Hydra's joblib launcher, one worker process per GPU).

joblib knows nothing of GPUs, and submitit's local executor gives every job the same ones (`CUDA_VISIBLE_DEVICES` of
the first `gpus_per_node`), so each worker claims a GPU of its own: an exclusive lock (`fcntl.flock`) on a file per
GPU in the machine's temporary directory, held for the worker's lifetime. Every job the worker runs goes to that
GPU, and no two jobs of any sweep on the machine share one while they measure. A worker that finds every GPU taken
(another sweep holds them) waits until one is released: the lock goes with the process that held it, also when it
dies.
"""
from __future__ import annotations

import fcntl
import logging
import os
import tempfile
import time
from pathlib import Path

import torch

from ssmcompress.errors import ConfigError

LAUNCHER = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
LOCK_DIR = Path(tempfile.gettempdir()) / "ssmcompress-gpus"
log = logging.getLogger(__name__)
_held: dict = {}  # this process's claim: {"index": GPU, "file": the open, locked file}


def pooled() -> bool:
    """Whether this process runs jobs of a sweep launched with Hydra's joblib launcher (several jobs at a time)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get().launcher.get("_target_") == LAUNCHER
    except (ImportError, ValueError):
        return False


def workers() -> int:
    """The joblib launcher's worker processes (hydra.launcher.n_jobs; -1: one per CPU, as joblib reads it)."""
    from hydra.core.hydra_config import HydraConfig

    return int(HydraConfig.get().launcher.n_jobs)


def check(count: int, jobs: int) -> None:
    """More workers than GPUs would leave some waiting for a GPU that a living worker never gives back."""
    if jobs < 1 or jobs > count:
        raise ConfigError(f"hydra/launcher=gpus runs one job per GPU: set hydra.launcher.n_jobs to at most the "
                          f"{count} GPU(s) of this machine (got {jobs})")


def claim(count: int, lock_dir: Path | None = None, wait_s: float = 1.0) -> int:
    """The index of a GPU (0..count-1) that no other process holds, held by this one until it exits (the same
    index on every later call); waits, polling every `wait_s` seconds, while all are held. Locks in `lock_dir`
    (default LOCK_DIR, the machine's)."""
    if "index" in _held:
        return _held["index"]
    lock_dir = Path(lock_dir or LOCK_DIR)
    lock_dir.mkdir(parents=True, exist_ok=True)
    waited = False
    while True:
        for index in range(count):
            handle = open(lock_dir / f"{index}.lock", "a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            _held.update(index=index, file=handle)
            return index
        if not waited:
            log.info(f"every one of the {count} GPU(s) is held by another job ({lock_dir}); waiting for one")
            waited = True
        time.sleep(wait_s)


def device() -> str:
    """This worker's GPU (`claim`), made the current CUDA device, as a device string for the model."""
    count = torch.cuda.device_count()
    check(count, workers())
    index = claim(count)
    torch.cuda.set_device(index)
    return f"cuda:{index}"
