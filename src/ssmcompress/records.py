"""The record of a run: one schema, validated when a record is written and when it is read.

A record is one JSON object per finished run in the results store (`tracking`), built by the runner and read by the
tables, the notebooks and W&B logging. `Record` lists every top-level field with its type; `from_dict` migrates a
record of an older schema (and refuses, with one line, one that is not a record), `to_dict` validates.

Schema history: 1 (no `schema` field): the records before versioning. 2: adds `schema`, `results_version`, `sweep`,
`model_init`, and per task `stderr` (lm-eval's standard errors) and `samples` (per-document values, for paired tests).
3: the run key names a bundled model or task with its content digest (config.portable_path). A schema-2 record
keeps its key: where it names a bundled file that key is no longer its config's (the tables leave it out, a sweep
reruns it), since which content it ran on is not recorded. 4: `model_info.generation` (1: Mamba-1, 2: Mamba-2) is
called `mamba_version` (text generation is "generation" everywhere else), and model_info describes hybrids (its
`family`, `layers`, ...); older records are read with the key renamed.
"""
from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field

from ssmcompress.config import RESULTS_VERSION, run_key
from ssmcompress.errors import ConfigError

SCHEMA = 4
# efficiency keys naming the path a measurement's forwards took per op (metrics.efficiency.kernel_paths, reduction_kernels,
# forward_path: eager launches or CUDA graph replays);
# a value carrying the marker is a pure-torch path on a GPU, whose latencies are not the kernels'
PATH_KEYS = ("scan_kernel", "conv_kernel", "norm_kernel", "attention_kernel", "decode_kernel", "reduction_kernels",
             "forward_path")
NOT_REPRESENTATIVE = "not representative"


def unrepresentative_paths(efficiency: dict) -> dict:
    """The path keys of an efficiency section whose path is not representative, with their values."""
    return {k: efficiency[k] for k in PATH_KEYS if NOT_REPRESENTATIVE in str(efficiency.get(k, ""))}


class RecordError(ConfigError):
    """A stored object that is not a valid record of any known schema."""


@dataclass
class Record:
    run_id: str
    key: str  # config.run_key of the config (and results version): resume and de-duplication
    time: str
    config: dict  # the resolved config
    model: str
    method: str
    benchmark: str
    protocol: str
    seed: int
    pruner: str
    timings: dict
    schema: int = SCHEMA
    results_version: int = RESULTS_VERSION  # the code's results version (config.RESULTS_VERSION) it was run with
    git: dict = field(default_factory=dict)  # commit (None outside a checkout), dirty, package version
    env: dict = field(default_factory=dict)  # host, python, torch, device, gpu or cpu
    ratio: float | None = None  # FLOPs fraction removed by token reduction (None: dense)
    layers: list | None = None
    sparsity: float | str | None = None  # weight pruning: a fraction or "N:M" (None: no pruner)
    tag: str | None = None
    sweep: str | None = None  # the multirun folder of the sweep it ran in
    model_info: dict = field(default_factory=dict)
    model_init: dict = field(default_factory=dict)  # {"random": bool, "seed": int when random}
    metrics: dict | None = None  # {task: {metric: value}} (lm-eval benchmarks)
    stderr: dict | None = None  # {task: {metric: standard error}} as lm-eval computes them
    samples: dict | None = None  # {task: {"doc_id": [...], metric: [per-document value]}} (harness.per_document)
    headline: dict | None = None  # the paper-style row: main metric per task, extra metrics, average
    flops: dict | None = None
    efficiency: dict | None = None
    generation: dict | None = None  # benchmark=generation (metrics.generation)
    reduction: dict | None = None  # reducer.describe()
    pruning: dict | None = None
    output_dir: str | None = None

    def to_dict(self) -> dict:
        record = dataclasses.asdict(self)
        validate(record)
        return json.loads(json.dumps(record, sort_keys=True, default=float))


FIELDS = {f.name: f for f in dataclasses.fields(Record)}
TYPES = typing.get_type_hints(Record)


def _allowed(hint) -> tuple:
    args = typing.get_args(hint) or (hint,)
    python = {dict: dict, list: list, str: str, int: int, float: (int, float), type(None): type(None)}
    out = []
    for arg in args:
        out += list(python[arg]) if isinstance(python[arg], tuple) else [python[arg]]
    return tuple(out)


def validate(record: dict) -> None:
    """One line naming the first missing, unknown or mistyped field."""
    if not isinstance(record, dict):
        raise RecordError(f"a record is a JSON object, got {type(record).__name__}")
    required = [n for n, f in FIELDS.items() if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING]
    missing = [n for n in required if n not in record]
    if missing:
        raise RecordError(f"record {record.get('run_id', '?')}: missing field {missing[0]!r}")
    unknown = sorted(set(record) - set(FIELDS))
    if unknown:
        raise RecordError(f"record {record.get('run_id', '?')}: unknown field {unknown[0]!r} (schema {SCHEMA})")
    for name, value in record.items():
        allowed = _allowed(TYPES[name])
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed and name != "git"):
            raise RecordError(f"record {record.get('run_id', '?')}: field {name!r} is a {type(value).__name__}, "
                              f"expected {' or '.join(t.__name__ for t in allowed)}")
    if record.get("schema") != SCHEMA:
        raise RecordError(f"record {record.get('run_id', '?')}: schema {record.get('schema')}, expected {SCHEMA}")


def migrate(record: dict) -> dict:
    """A record of any known schema as a current-schema record (a copy); RecordError for anything else."""
    if not isinstance(record, dict):
        raise RecordError(f"a record is a JSON object, got {type(record).__name__}")
    schema = record.get("schema", 1)
    if schema in (2, 3, SCHEMA):
        upgraded = dict(record, schema=SCHEMA)
        if "model_info" in record:
            upgraded["model_info"] = renamed_version(record["model_info"])
        upgraded["generation"] = graphs_of_host(upgraded)
        validate(upgraded)
        return upgraded
    if schema != 1 or not isinstance(record.get("config"), dict):
        raise RecordError(f"record {record.get('run_id', '?')}: unknown schema {schema!r} (this code reads 1 to "
                          f"{SCHEMA})")
    config = record["config"]
    model = config.get("model") or {}
    upgraded = dict(record, schema=SCHEMA, results_version=1, sweep=None, stderr=None, samples=None,
                    model_init=dict(random=True, seed=config.get("seed", 0)) if model.get("random_init")
                    else dict(random=False))
    # version-1 keys hashed absolute paths; the key of the same config now (it never matches a current run: the
    # results version is part of it)
    upgraded["key"] = run_key(config, results_version=1)
    if "model_info" in record:
        upgraded["model_info"] = renamed_version(record["model_info"])
    upgraded = {k: v for k, v in upgraded.items() if k in FIELDS}
    validate(upgraded)
    return upgraded


def graphs_of_host(record: dict):
    """The generation section with `cuda_graphs` false for a transformers model: its host decodes through
    transformers' `generate`, which has no CUDA graphs; the first records of that host said true (read off the
    device alone)."""
    section = record.get("generation")
    if not isinstance(section, dict) or (record.get("model_info") or {}).get("family") != "hf":
        return section
    return {**section, "cuda_graphs": False}


def renamed_version(model_info):
    """model_info with schema 3's `generation` (the Mamba version) as `mamba_version`."""
    if not isinstance(model_info, dict) or "generation" not in model_info:
        return model_info
    info = {k: v for k, v in model_info.items() if k != "generation"}
    return {**info, "mamba_version": model_info["generation"]}


def from_dict(record: dict) -> Record:
    return Record(**migrate(record))
