"""Records for the tables: from the local results store and from W&B, as one flat row per run.

Every record read here is a `records.Record` (the store's are migrated by `tracking.load`; W&B runs are rebuilt into
one), so a row reads the schema's fields and nothing else.
"""
from __future__ import annotations

import functools
import logging
import math

import pandas as pd
from omegaconf import OmegaConf

from ssmcompress import hosts, records, tracking
from ssmcompress.config import CONF_DIR, REDUCER_KEYS, RESULTS_VERSION, register_resolvers, run_key
from ssmcompress.metrics.capture import CUDA_GRAPH

log = logging.getLogger(__name__)
# the record sections tracking.WandbLogger writes into a run's summary ("<section>/<path>")
WANDB_SECTIONS = ("metrics", "headline", "flops", "efficiency", "timings", "pruning", "reduction")
GROUPS = ("model", "benchmark", "method", "pruner")  # config groups an experiment selects in its defaults list


def load_records(results_dir, wandb_path: str | None = None, api=None) -> list[dict]:
    """The local store's records, plus (with `wandb_path` = "entity/project") those of the W&B project."""
    found = tracking.load(results_dir)
    if wandb_path:
        found += records_from_wandb(wandb_path, api)
    return found


def records_from_wandb(path: str, api=None) -> list[dict]:
    """Records rebuilt from W&B runs (public API): the run's config is the resolved config (plus the `run` section
    WandbLogger adds: key, run id, commit), its summary the record's numbers ("headline/<task>", ...). W&B holds no
    results version: it is the one whose run key of the config is the run's key (a run of no known version is
    skipped); the model's architecture facts come from its config (its host's `info_from_config`). Standard
    errors and per-document samples are not logged to W&B, so these records have none."""
    if api is None:
        import wandb

        api = wandb.Api()
    rebuilt = []
    for run in api.runs(path):
        summary = dict(getattr(run.summary, "_json_dict", None) or run.summary)
        if "key" not in summary:
            continue  # not a run of ours
        config = {k: v["value"] if isinstance(v, dict) and set(v) <= {"value", "desc"} and "value" in v else v
                  for k, v in dict(run.config).items()}
        identity = config.pop("run", None) or {}
        version = next((v for v in range(RESULTS_VERSION, 0, -1) if run_key(config, v) == summary["key"]), None)
        if version is None:
            log.warning(f"W&B run {run.id}: its key {summary['key']} is no results version's key of its config; "
                        f"skipped")
            continue
        sections = {}
        for name, value in summary.items():
            section, _, rest = name.partition("/")
            if section in WANDB_SECTIONS and rest:
                if section == "headline":  # headline keys are flat ("task/perplexity")
                    sections.setdefault(section, {})[rest] = value
                else:
                    tree = sections.setdefault(section, {})
                    *parents, leaf = rest.split("/")
                    for part in parents:
                        tree = tree.setdefault(part, {})
                    tree[leaf] = value
        pruner = (config.get("pruner") or {}).get("name", "none")
        method, model = config["method"]["name"], config["model"]
        record = records.Record(
            run_id=run.id, key=summary["key"], time=str(getattr(run, "created_at", "") or ""), config=config,
            model=model["name"], method=method, benchmark=config["benchmark"]["name"],
            protocol=config.get("protocol", "exact"), seed=config.get("seed", 0), pruner=pruner,
            timings=sections.pop("timings", {}), results_version=version, git=identity.get("git") or {},
            ratio=None if method == "dense" else config.get("ratio"),
            layers=None if method == "dense" else config.get("layers"),
            sparsity=None if pruner == "none" else config.get("sparsity"), tag=config.get("tag"),
            model_info=hosts.HOSTS[model.get("family") or hosts.detect(model["config"])].info_from_config(
                model["config"]) if model.get("config") else {}, **sections)
        rebuilt.append(record.to_dict())
    return rebuilt


# ---------------------------------------------------------------------------------------------- the defaults

@functools.lru_cache(maxsize=None)
def group_option(group: str, name: str) -> dict | None:
    """conf/<group>/<name> as Hydra composes it (interpolations left as text); None if there is no such option."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import MissingConfigException

    register_resolvers()
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
            cfg = compose("config", overrides=[f"{group}={name}"])
    except MissingConfigException:
        return None
    return OmegaConf.to_container(cfg[group], resolve=False)


@functools.lru_cache(maxsize=None)
def primary_defaults() -> dict:
    """What conf/config.yaml selects when a sweep says nothing: {"model": "mamba2-tiny", "method": "dense", ...,
    "protocol": "exact", "seed": 0}."""
    raw = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "config.yaml"), resolve=False)
    chosen = {k: v for item in raw.get("defaults", []) if isinstance(item, dict) for k, v in item.items()}
    return {**{g: chosen[g] for g in GROUPS if g in chosen},
            **{k: raw[k] for k in ("protocol", "seed")}}


def method_defaults(name: str) -> dict:
    """The literal (non-interpolated) parameters of a method's config, flat: {"method.importance": "clip"}."""
    option = group_option("method", name) or {}
    return {k: v for k, v in flatten(option, "method").items()
            if k != "method.name" and not (isinstance(v, str) and "${" in v)}


def model_mamba_version(name: str) -> int | None:
    """1 (Mamba) or 2 (Mamba-2) from conf/model/<name>'s mamba-ssm config; None for other families or models."""
    group = group_option("model", name) or {}
    if group.get("family", "mamba") != "mamba" or not group.get("config"):
        return None
    return hosts.mamba_ssm.mamba_version(group["config"])


# ---------------------------------------------------------------------------------------------- record -> row

def flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(flatten(value, name))
        else:
            out[name] = hashable(value)
    return out


def hashable(value):
    if isinstance(value, (list, tuple)):
        return tuple(hashable(v) for v in value)
    if hasattr(value, "text") and not isinstance(value, str):  # Hydra's QuotedString
        return value.text
    return value


def commit_label(git: dict) -> str:
    commit = git.get("commit")
    return "no commit" if not commit else commit[:7] + (" (dirty)" if git.get("dirty") else "")


def to_row(stored: dict) -> dict:
    """A record as flat columns: the axes (named as Hydra overrides), the method's parameters ("method.q"), the
    settings it changes from the defaults ("variant"), provenance, and the record's sections as they are."""
    record = records.from_dict(stored)  # every field of the schema, its default where an older record has none
    config = record.config
    benchmark, model = config["benchmark"], config["model"]
    method, pruner = record.method, record.pruner
    measured = record.efficiency or record.generation or {}
    dense = method == "dense"
    row = dict(key=record.key, run_id=record.run_id, time=record.time, tag=record.tag, model=record.model,
               benchmark=record.benchmark, kind=benchmark["kind"], protocol=record.protocol, seed=record.seed,
               method=method, pruner=pruner, results_version=record.results_version,
               commit=commit_label(record.git), limit=benchmark.get("limit"),  # efficiency benchmarks have none
               device=measured.get("device_name") or record.env.get("gpu") or record.env.get("cpu"),
               mamba_version=record.model_info.get("mamba_version"),
               family=record.model_info.get("family") or model.get("family", "mamba"))
    # a key other than its config's under this package: it ran on other contents of a bundled model or task
    row["stale_key"] = record.key != run_key(config, results_version=record.results_version)
    row["shape"] = f"batch {measured['batch_size']} x {measured['length']}" if measured else None
    if record.generation:
        row["shape"] += f" + {measured['new_tokens']} tokens"
    row["captured"] = measured.get("forward_path") == CUDA_GRAPH  # replays and eager launches are tables apart
    row["ratio"] = 0.0 if dense or record.ratio is None else round(float(record.ratio), 6)
    row["layers"] = None if dense else hashable(record.layers)
    for key, default in REDUCER_KEYS.items():  # records older than a setting ran at its default
        row[key] = default if dense else config.get(key, default)
    row["sparsity"] = 0.0 if pruner == "none" else hashable(record.sparsity)
    params = {k: v for k, v in flatten(config["method"], "method").items() if k != "method.name"}
    row.update(params)
    defaults = method_defaults(method)
    variant = [k for k, v in params.items() if k in defaults and v != defaults[k]]
    variant += ["layers"] * (row["layers"] is not None) + ["pruner", "sparsity"] * (pruner != "none")
    variant += [key for key, default in REDUCER_KEYS.items() if row[key] != default]
    row["variant"] = tuple(sorted(variant))
    row["tasks"] = tuple(benchmark.get("tasks") or ())
    row["extra_metrics"] = benchmark.get("extra_metrics") or {}
    row["main_metric"] = benchmark.get("main_metric") or {}
    for section in ("metrics", "stderr", "samples", "headline", "flops", "efficiency", "reduction"):
        row[section] = getattr(record, section) or {}
    row["generation_speed"] = record.generation or {}  # the section (text generation)
    return row


def frame(found: list[dict]) -> pd.DataFrame:
    """One row per distinct run key; the latest record wins (a config run twice counts once, never twice)."""
    rows = [to_row(record) for record in found]
    df = pd.DataFrame(rows, columns=list(dict.fromkeys(k for row in rows for k in row)) or ["key", "time"])
    if df.empty:
        df.attrs["duplicates"] = 0
        return df
    df["_order"] = range(len(df))
    df["_time"] = pd.to_datetime(df["time"], utc=True, errors="coerce", format="mixed")
    df = df.sort_values(["_time", "_order"], na_position="first", kind="stable")
    duplicates = int(df["key"].duplicated().sum())
    df = df.drop_duplicates("key", keep="last").drop(columns=["_order", "_time"]).reset_index(drop=True)
    df.attrs["duplicates"] = duplicates
    return df


def value(row: dict, axis: str):
    """A row's setting, None where the row has none (pandas fills absent columns with NaN)."""
    found = row.get(axis)
    return None if isinstance(found, float) and math.isnan(found) else found
