"""A small results store made by a real tiny sweep, once per test session (tables, notebooks and resume tests).

`python run.py -m +experiment=main` on a random 4-layer Mamba-2 (benchmark.limit=2, logger=none, no efficiency
measurement) for dense and the reduction methods of METHODS that exist, at two ratios. The first attempt is killed
(SIGKILL, as a lost node) as soon as its first record is in the store; the same command then resumes it.
Test modules share it through their own session fixture: `sweep = pytest.fixture(scope="session")(tiny_sweep)`.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ssmcompress.config import REPO, available

METHODS = ("ours", "evit")  # besides dense; those not yet in conf/method are left out
RATIOS = (0.2, 0.3)
TINY = ["model=mamba2-tiny", "model.random_init=true", "model.config.n_layer=4", "model.config.d_model=64",
        "model.tokenizer=${asset:models/mamba2-tiny}", "benchmark.limit=2", "++benchmark.measure.enabled=false",
        "logger=none"]


@dataclass
class Sweep:
    results: Path            # the results store directory
    methods: list[str]       # dense first
    jobs: int                # jobs of the sweep (dense once per ratio)
    distinct: int            # distinct configs (dense once)
    killed_store: str        # records.jsonl when the first attempt was killed
    first: subprocess.CompletedProcess
    second: subprocess.CompletedProcess

    def command(self, *extra: str) -> list[str]:
        return sweep_command(self.results, self.results.parent / "multirun", self.methods, RATIOS, *extra)


def sweep_command(results: Path, sweep_dir: Path, methods, ratios, *extra: str) -> list[str]:
    return [sys.executable, "run.py", "-m", "+experiment=main", *TINY, f"method={','.join(methods)}",
            f"ratio={','.join(map(str, ratios))}", f"results_dir={results}", f"hydra.sweep.dir={sweep_dir}", *extra]


def run(command: list[str], timeout: float = 900) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


_CACHE: dict[str, Sweep] = {}


def tiny_sweep(tmp_path_factory) -> Sweep:
    if "sweep" in _CACHE:
        return _CACHE["sweep"]
    root = tmp_path_factory.mktemp("tiny-sweep")
    results = root / "results"
    methods = ["dense", *(m for m in METHODS if m in available("method"))]
    command = sweep_command(results, root / "multirun", methods, RATIOS)
    store = results / "records.jsonl"

    # first attempt: killed (the whole process group) once the first record is written
    with open(root / "first.log", "w") as log:
        process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True,
                                   start_new_session=True)
        deadline = time.monotonic() + 900
        while process.poll() is None and time.monotonic() < deadline:
            if store.exists() and store.read_text().endswith("\n"):
                os.killpg(process.pid, signal.SIGKILL)
                break
            time.sleep(0.1)
        process.wait()
    killed_store = store.read_text() if store.exists() else ""
    first = subprocess.CompletedProcess(command, process.returncode, (root / "first.log").read_text(), "")
    second = run(command)  # resume
    n_reduced = len(methods) - 1
    _CACHE["sweep"] = Sweep(results, methods, jobs=len(methods) * len(RATIOS), distinct=1 + n_reduced * len(RATIOS),
                            killed_store=killed_store, first=first, second=second)
    return _CACHE["sweep"]
