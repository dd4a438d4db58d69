"""Where results go: the local results store (append-only JSONL) and Weights & Biases.

The store is `<results_dir>/records.jsonl`, one JSON record per finished run. Nothing is lost, nothing duplicated:
- a record is written once, at the end of a run, in one append under a file lock (`fcntl.flock`), so a run that dies
  halfway leaves nothing behind and concurrent jobs (SLURM arrays, two launchers) never interleave lines;
- an append never goes after a line without its newline: a complete record there (a file saved by an editor or
  written by another tool) gets its newline and stays; anything else (a writer killed mid-write) is moved to
  `records.rejected.jsonl` beside the store, with the time and the reason, and reported; the store stays valid JSONL;
- reading skips (and reports) any line that is not a record, so one bad line never stops a sweep;
- a job that resumes a sweep claims its run key first (`claim`: an exclusive lock on `<results_dir>/.claims/<key>`,
  released by the OS when the job ends, also when it is killed), so a second launcher of the same sweep skips the
  runs another one is doing instead of doing them again;
- the record is in the store before anything is sent to W&B: a W&B failure is reported and loses nothing
  (`python -m ssmcompress.tracking wandb --results DIR RUN_ID ...` logs stored records to W&B later).
Locks are POSIX advisory locks: on a cluster, keep results_dir on a file system that supports them (local disks,
NFSv4, Lustre, GPFS do).
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import platform
import subprocess
import time
import uuid
from pathlib import Path

from ssmcompress import __version__, records
from ssmcompress.config import PACKAGE, RESULTS_VERSION, to_dict
from ssmcompress.errors import ConfigError
from ssmcompress.metrics import per_layer_rows

STORE = "records.jsonl"
REJECTED = "records.rejected.jsonl"
CLAIMS = ".claims"
log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------- checks

def check_config(cfg) -> None:
    """The results store and the logger, before any work: results_dir is (or can become) a writable directory whose
    store can be read, and the W&B settings are ones W&B accepts."""
    directory = Path(str(cfg.results_dir)).expanduser()
    existing = next((p for p in [directory, *directory.parents] if p.exists()), None)
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"results_dir {directory} is a file, not a directory")
    if existing is None or not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"results_dir {directory} cannot be written (no permission on {existing}); "
                          f"set results_dir=<a writable directory>")
    store = directory / STORE
    if store.exists() and not os.access(store, os.R_OK | os.W_OK):
        raise ConfigError(f"the results store {store} cannot be read and written")
    logger = to_dict(cfg.logger)
    if logger.get("name") not in ("wandb", "none"):
        raise ConfigError(f"unknown logger {logger.get('name')!r}: use logger=wandb or logger=none")
    if logger["name"] == "wandb":
        check_wandb(logger)


def check_wandb(logger: dict) -> None:
    """W&B's own settings validation (a pydantic model) on the configured mode, project and entity."""
    from wandb import Settings

    try:
        Settings(mode=logger.get("mode") or "offline", project=logger.get("project"), entity=logger.get("entity"))
    except Exception as error:  # pydantic's ValidationError: which field, which values are allowed
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        detail = "; ".join(lines[1:3]) if len(lines) > 1 else str(error)
        raise ConfigError(f"W&B rejects the logger settings ({detail}); e.g. logger.mode=offline|online|disabled, "
                          f"or logger=none") from None


# ---------------------------------------------------------------------------------------------------- records

def git_state() -> dict:
    """The commit of the checkout this package runs from (None for an installed wheel), and whether it was dirty."""
    def git(*args: str) -> str:
        try:
            result = subprocess.run(["git", "-C", str(PACKAGE), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return result.stdout.strip() if result.returncode == 0 else ""

    commit = git("rev-parse", "HEAD")
    return dict(commit=commit or None, dirty=bool(commit) and bool(git("status", "--porcelain", "--untracked-files=no")),
                version=__version__)


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
    """The fields every record starts with (records.Record lists them all)."""
    return dict(run_id=uuid.uuid4().hex[:12], key=key, time=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                git=git_state(), env=environment(device), config=config, schema=records.SCHEMA,
                results_version=RESULTS_VERSION)


# ---------------------------------------------------------------------------------------------------- the store

def store_path(results_dir: str | os.PathLike) -> Path:
    return Path(results_dir).expanduser() / STORE


def append(record: dict, results_dir: str | os.PathLike) -> Path:
    """Append one record (validated against the schema) under the store's lock, after setting aside a partial last
    line (see the module doc)."""
    records.validate(record)
    path = store_path(results_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record, sort_keys=True, default=float) + "\n").encode()
    with open(path, "ab+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            set_aside_partial_line(f, path)
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
    return path


def set_aside_partial_line(f, path: Path) -> None:
    """If the locked store `f` does not end in a newline: a last line that is a record gets its newline, any other (a
    partial line) moves to the rejected file."""
    size = f.seek(0, os.SEEK_END)
    if size == 0:
        return
    f.seek(size - 1)
    if f.read(1) == b"\n":
        return
    start = size
    while start > 0:  # back to the previous newline, in blocks
        block = min(start, 65536)
        f.seek(start - block)
        newline = f.read(block).rfind(b"\n")
        if newline >= 0:
            start = start - block + newline + 1
            break
        start -= block
    f.seek(start)
    partial = f.read().decode("utf-8", errors="replace")
    if is_record(partial):
        f.seek(0, os.SEEK_END)
        f.write(b"\n")
        return
    rejected = path.with_name(REJECTED)
    with open(rejected, "a") as side:
        side.write(json.dumps(dict(time=time.strftime("%Y-%m-%dT%H:%M:%S%z"), store=str(path), offset=start,
                                   reason="last line had no newline (a writer stopped mid-write)", line=partial))
                   + "\n")
    f.truncate(start)
    f.seek(0, os.SEEK_END)
    log.warning(f"results store {path}: its last line was incomplete ({len(partial)} characters, a run killed while "
                f"writing); moved to {rejected}")


def is_record(line: str) -> bool:
    try:
        records.migrate(json.loads(line))
    except (json.JSONDecodeError, records.RecordError):
        return False
    return True


def load(results_dir: str | os.PathLike) -> list[dict]:
    """Every readable record of the store, as schema-2 records (older ones migrated: records.migrate); lines that are
    not records are reported and skipped."""
    path = store_path(results_dir)
    if not path.exists():
        return []
    found, bad = [], []
    text = path.read_text(errors="replace")
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            found.append(records.migrate(json.loads(line)))
        except (json.JSONDecodeError, records.RecordError):
            bad.append(number)
    if bad:
        partial = " (the last one incomplete: the next append sets it aside)" if not text.endswith("\n") else ""
        log.warning(f"results store {path}: skipped {len(bad)} line(s) that are not records {bad[:5]}{partial}")
    return found


def has_key(results_dir: str | os.PathLike, key: str) -> bool:
    return any(record.get("key") == key for record in load(results_dir))


@contextlib.contextmanager
def claim(results_dir: str | os.PathLike, key: str):
    """Yield True while this process holds run `key` of the store (False: another live process holds it). The lock
    file stays (removing it could let two later jobs lock two different files of one name)."""
    directory = Path(results_dir).expanduser() / CLAIMS
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / key, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            f.truncate(0)
            f.write(json.dumps(dict(pid=os.getpid(), host=platform.node(), time=time.strftime("%Y-%m-%dT%H:%M:%S%z")))
                    + "\n")
            f.flush()
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------------------- W&B

def wandb_identity(record: dict) -> dict:
    """Name, group, tags and job type of a record's W&B run (the lightning-hydra-template conventions): the name is
    unique per configuration (it ends in the run key), the group is the sweep (its tag, else its output folder)."""
    ratio = record.get("ratio")
    parts = [record["model"], record["method"]] + ([f"r{ratio:g}"] if ratio else [])
    if record.get("pruner") not in (None, "none"):
        parts += [record["pruner"], f"s{record.get('sparsity')}"]
    group = record.get("tag") or record.get("sweep")
    tags = [f"model:{record['model']}", f"method:{record['method']}", f"benchmark:{record['benchmark']}"]
    tags += [f"ratio:{ratio:g}"] if ratio else []
    tags += [f"pruner:{record['pruner']}", f"sparsity:{record.get('sparsity')}"] \
        if record.get("pruner") not in (None, "none") else []
    return dict(name="-".join(parts + [record["key"][:8]]), group=group, tags=tags, job_type=record["benchmark"])


class WandbLogger:
    """One W&B run per job: config (with the run key, run id and commit) at init, the record's numbers as summary,
    per-layer data as tables."""

    def __init__(self, logger_cfg: dict, record: dict, run_dir: str | os.PathLike):
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        self.wandb = wandb
        config = dict(record["config"], run=dict(key=record["key"], run_id=record["run_id"], git=record.get("git")))
        self.run = wandb.init(project=logger_cfg.get("project"), entity=logger_cfg.get("entity"),
                              mode=logger_cfg.get("mode", "offline"), config=config, dir=str(run_dir),
                              reinit="finish_previous", **wandb_identity(record))

    def log(self, record: dict) -> None:
        flat = {}
        for section in ("metrics", "headline", "flops", "efficiency", "timings", "pruning", "reduction"):
            for key, value in _flatten(record.get(section) or {}, section).items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    flat[key] = value
        self.run.log(flat)
        for key, value in flat.items():
            self.run.summary[key] = value
        self.run.summary["key"] = record["key"]
        self.run.summary["run_id"] = record["run_id"]
        self.log_per_layer(record)

    def log_per_layer(self, record: dict) -> None:
        """Per-layer tokens and FLOPs (dense vs reduced) as a W&B table, so each layer's reduction is visible."""
        rows = per_layer_rows(record.get("flops") or {})
        if rows:
            table = self.wandb.Table(columns=list(rows[0]), data=[list(row.values()) for row in rows])
            self.run.log({"flops/per_layer": table})

    def finish(self) -> None:
        self.run.finish()


def log_to_wandb(record: dict, logger_cfg: dict, run_dir: str | os.PathLike) -> bool:
    """Log a stored record to W&B; a failure is reported (the record stays in the store) and returns False."""
    try:
        logger = WandbLogger(logger_cfg, record, run_dir)
        logger.log(record)
        logger.finish()
        return True
    except Exception as error:  # any W&B failure (network, settings, its service): the record is already stored
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        log.error(f"W&B logging failed for run {record['run_id']} ({type(error).__name__}: {first}); the record is "
                  f"in the results store: log it later with `python -m ssmcompress.tracking wandb --results "
                  f"<results_dir> {record['run_id']}`")
        return False


def _flatten(tree, prefix: str) -> dict:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}/{key}"))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ssmcompress.tracking",
                                     description="Log records of a results store to W&B (e.g. after a W&B failure).")
    commands = parser.add_subparsers(dest="command", required=True)
    wandb_cmd = commands.add_parser("wandb", help="log stored records to W&B")
    wandb_cmd.add_argument("run_ids", nargs="*", help="run ids to log (default: every record of the store)")
    wandb_cmd.add_argument("--results", default="outputs/results", help="the results store directory")
    wandb_cmd.add_argument("--project", default="ssmcompress")
    wandb_cmd.add_argument("--entity", default=None)
    wandb_cmd.add_argument("--mode", default=os.environ.get("WANDB_MODE", "offline"))
    wandb_cmd.add_argument("--dir", default="outputs/wandb-resync", help="where W&B writes its files")
    args = parser.parse_args(argv)
    records = [r for r in load(args.results) if not args.run_ids or r.get("run_id") in args.run_ids]
    logger_cfg = dict(project=args.project, entity=args.entity, mode=args.mode)
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    failed = sum(not log_to_wandb(record, logger_cfg, args.dir) for record in records)
    print(f"logged {len(records) - failed} of {len(records)} record(s) to W&B ({args.mode})")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
