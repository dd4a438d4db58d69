"""Where results go: the local results store (append-only JSONL) and Weights & Biases.

A record is written once, at the end of a run, in one append under a file lock, so a run that dies halfway
leaves nothing behind and concurrent jobs (SLURM arrays) never interleave lines.
"""
from __future__ import annotations

import fcntl
import json
import os
import platform
import subprocess
import time
import uuid
from pathlib import Path

from ssmcompress.config import REPO

STORE = "records.jsonl"


def git_state() -> dict:
    def git(*args: str) -> str:
        result = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
        return result.stdout.strip() if result.returncode == 0 else ""

    commit = git("rev-parse", "HEAD")
    return dict(commit=commit or None, dirty=bool(git("status", "--porcelain", "--untracked-files=no")))


def environment(device: str) -> dict:
    import torch

    info = dict(host=platform.node(), python=platform.python_version(), torch=torch.__version__, device=device)
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    else:
        info["cpu"] = platform.processor() or platform.machine()
        info["threads"] = torch.get_num_threads()
    return info


def new_record(key: str, config: dict, device: str) -> dict:
    return dict(run_id=uuid.uuid4().hex[:12], key=key, time=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                git=git_state(), env=environment(device), config=config)


def append(record: dict, results_dir: str | os.PathLike) -> Path:
    path = Path(results_dir) / STORE
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, sort_keys=True, default=float) + "\n"
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(line)
        f.flush()
        os.fsync(f.fileno())
        fcntl.flock(f, fcntl.LOCK_UN)
    return path


def load(results_dir: str | os.PathLike) -> list[dict]:
    path = Path(results_dir) / STORE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def has_key(results_dir: str | os.PathLike, key: str) -> bool:
    return any(record.get("key") == key for record in load(results_dir))


class WandbLogger:
    """One W&B run per job: config at init, the record's numbers as summary, per-layer data as tables."""

    def __init__(self, logger_cfg: dict, config: dict, run_dir: str | os.PathLike, name: str):
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        self.wandb = wandb
        self.run = wandb.init(project=logger_cfg.get("project"), entity=logger_cfg.get("entity"),
                              mode=logger_cfg.get("mode", "offline"), config=config, dir=str(run_dir), name=name,
                              reinit="finish_previous")

    def log(self, record: dict) -> None:
        flat = {}
        for section in ("metrics", "headline", "flops", "efficiency", "timings", "pruning", "reduction"):
            for key, value in _flatten(record.get(section, {}), section).items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    flat[key] = value
        self.run.log(flat)
        for key, value in flat.items():
            self.run.summary[key] = value
        self.run.summary["key"] = record["key"]
        self.log_per_layer(record)

    def log_per_layer(self, record: dict) -> None:
        """Per-layer tokens and FLOPs (dense vs reduced) as a W&B table, so each layer's reduction is visible."""
        from ssmcompress.metrics import per_layer_rows

        rows = per_layer_rows(record.get("flops") or {})
        if rows:
            table = self.wandb.Table(columns=list(rows[0]), data=[list(row.values()) for row in rows])
            self.run.log({"flops/per_layer": table})

    def finish(self) -> None:
        self.run.finish()


def _flatten(tree, prefix: str) -> dict:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}/{key}"))
    return out
