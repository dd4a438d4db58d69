"""One GPU per worker of a sweep that runs jobs side by side (hydra/launcher=gpus): claims are exclusive across
processes, kept for a worker's lifetime, released when it dies; the model goes to the claimed GPU."""
import subprocess
import sys

import pytest
import torch

from ssmcompress import distributed, gpu_pool
from ssmcompress.errors import ConfigError

CLAIMER = ("import sys; from ssmcompress import gpu_pool; "
           "print(gpu_pool.claim(2, sys.argv[1], wait_s=0.05), flush=True); sys.stdin.read()")


def claimer(lock_dir):
    """A process that claims one of 2 GPUs, prints its index and holds it until its stdin closes."""
    return subprocess.Popen([sys.executable, "-c", CLAIMER, str(lock_dir)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)


def test_claims_are_exclusive_and_released_when_the_holder_dies(tmp_path):
    first, second = claimer(tmp_path), claimer(tmp_path)
    held = {first.stdout.readline().strip(), second.stdout.readline().strip()}
    assert held == {"0", "1"}
    third = claimer(tmp_path)  # both held: it waits
    first.kill()
    first.wait()
    assert third.stdout.readline().strip() in held  # the GPU the killed process held
    for process in (second, third):
        process.stdin.close()
        process.wait(timeout=60)


def test_a_worker_keeps_its_gpu_from_job_to_job(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_pool, "_held", {})
    assert gpu_pool.claim(3, tmp_path) == 0
    assert gpu_pool.claim(3, tmp_path) == 0  # the same worker, a later job
    gpu_pool._held["file"].close()


def test_more_workers_than_gpus_is_refused():
    gpu_pool.check(4, 4)
    with pytest.raises(ConfigError, match="at most the 2 GPU"):
        gpu_pool.check(2, 3)


def test_a_pooled_job_puts_its_model_on_the_claimed_gpu(tmp_path, monkeypatch):
    """distributed.device under the gpus launcher (the GPU calls mocked: only the choice is tested here)."""
    monkeypatch.setattr(gpu_pool, "_held", {})
    monkeypatch.setattr(gpu_pool, "LOCK_DIR", tmp_path)
    monkeypatch.setattr(gpu_pool, "pooled", lambda: True)
    monkeypatch.setattr(gpu_pool, "workers", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    (tmp_path / "0.lock").touch()
    holder = claimer(tmp_path)  # another worker holds GPU 0
    assert holder.stdout.readline().strip() == "0"
    assert distributed.device("cuda") == "cuda:1" and chosen == [1]
    assert distributed.device("cpu") == "cpu"
    holder.stdin.close()
    holder.wait(timeout=60)
    gpu_pool._held["file"].close()


def test_outside_a_joblib_sweep_nothing_is_claimed():
    assert not gpu_pool.pooled()
    assert distributed.device("cpu") == "cpu"
