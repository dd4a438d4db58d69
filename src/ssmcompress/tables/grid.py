"""The rows each table must have, from the sweep files (conf/experiment), and which records may fill them.

A sweep's grid is the rows its table must have: a run that has not finished (or failed) is shown as missing and
counted, never dropped. A record belongs to a table when it has the sweep's fixed settings and every setting it
changes from the defaults (a method parameter, the reduction layers, a pruner) is one the sweep varies, so one run
(UTR at 20 %) fills its cell in Tables 1, 3 and 4 alike: records are matched by content, not by tag. A record that
belongs to a table enters its cell only if it was run as the sweep runs (`admission`): on every document (no
benchmark.limit), with one of the sweep's seeds, by the current results version (unless asked otherwise).
Sweeps are read with Hydra's public override grammar (`hydra.core.override_parser`), as the sweeper reads them.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from ssmcompress.config import EXPERIMENTS, REDUCER_KEYS, RESULTS_VERSION
from ssmcompress.tables.sources import (GROUPS, flatten, hashable, method_defaults, model_mamba_version,
                                        primary_defaults, value)

SCALARS = ("ratio", "layers", *REDUCER_KEYS, "sparsity", "protocol", "seed")  # top-level settings a sweep may fix
MODEL_SPECIFIC = ("layers",)  # sweep values that fit only the sweep's own models (layer indices)
FREE = ("protocol", "device", "shape")  # splits a sweep does not pin: its expected rows join every such table
NOT_MATCHED = FREE + ("model", "benchmark", "seed")  # fixed settings a record need not share to belong to a table
CLOSED = ("method", "pruner", *REDUCER_KEYS)  # swept choices a record must take from the sweep's own values: another
# sweep's method (a positional baseline) has its own table, while another model or ratio joins this one


@dataclass
class Experiment:
    """A sweep's settings: `fixed` {axis: value} and `dims`, each a list of alternatives {axis: value, ...}
    (one axis each, or several for a nested group of experiments/, whose options are kept in `groups`)."""
    name: str
    fixed: dict = field(default_factory=dict)
    dims: list[list[dict]] = field(default_factory=list)
    groups: dict = field(default_factory=dict)

    @property
    def swept(self) -> list[str]:
        return list(dict.fromkeys(k for alternatives in self.dims for alt in alternatives for k in alt))

    @property
    def grouped(self) -> set:
        return {k for options in self.groups.values() for settings in options.values() for k in settings}

    def values(self, axis: str) -> list:
        if axis in self.fixed:
            return [self.fixed[axis]]
        return list(dict.fromkeys(alt[axis] for alternatives in self.dims for alt in alternatives if axis in alt))

    def label_groups(self, row: dict) -> dict:
        """Per nested group, the name of the option whose settings the row has (else the settings themselves)."""
        for group, options in self.groups.items():
            name = next((n for n, settings in options.items()
                         if all(value(row, k) == v for k, v in settings.items())), None)
            if name is None:
                keys = list(next(iter(options.values())))
                name = ", ".join(f"{k.split('.')[-1]}={value(row, k)}" for k in keys)
            row = {**row, group: name}
        return row


def _settings(raw: dict) -> dict:
    """The axis settings of an experiment file (or of one option of a nested group of experiments/)."""
    fixed = {}
    for item in raw.get("defaults") or []:
        if isinstance(item, dict):
            for key, chosen in item.items():
                key = key.replace("override", "").strip().lstrip("/")
                if key in GROUPS:
                    fixed[key] = chosen
    fixed.update({k: raw[k] for k in SCALARS if k in raw})
    fixed.update(flatten({k: v for k, v in (raw.get("method") or {}).items() if k != "name"}, "method"))
    return {k: hashable(v) for k, v in fixed.items()}


def _load(path: Path) -> dict:
    return OmegaConf.to_container(OmegaConf.load(path), resolve=False)


def sweep_overrides(name: str, directory: Path = EXPERIMENTS) -> list:
    """The parsed overrides of <directory>/<name>.yaml's hydra.sweeper.params (Hydra's override grammar)."""
    params = ((_load(directory / f"{name}.yaml").get("hydra") or {}).get("sweeper") or {}).get("params") or {}
    return OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])


def sweep_jobs(name: str, directory: Path = EXPERIMENTS) -> list[list[str]]:
    """The override list of each job of `python run.py -m +experiment=<name>`, in the order Hydra's basic sweeper
    runs them: the product of every override's values, "key=value" strings as the sweeper writes them."""
    choices = [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override()
               else [f"{o.get_key_element()}={o.get_value_element_as_str()}"] for o in sweep_overrides(name, directory)]
    return [list(job) for job in itertools.product(*choices)]


def load_experiment(name: str, directory: Path = EXPERIMENTS) -> Experiment:
    """<directory>/<name>.yaml: fixed settings from its defaults list and keys (else conf/config.yaml's), swept ones
    from hydra.sweeper.params (`+experiment/<group>: a,b` sweeps the nested options of <directory>/<group>/)."""
    experiment = Experiment(name, {**primary_defaults(), **_settings(_load(directory / f"{name}.yaml"))})
    for override in sweep_overrides(name, directory):
        values = override.value().list if override.is_choice_sweep() else [override.value()]
        key = override.key_or_group.lstrip("+~")
        if key.startswith("experiment/"):
            group = key.split("/", 1)[1]
            options = {str(v): _settings(_load(directory / group / f"{v}.yaml")) for v in values}
            keys = list(dict.fromkeys(k for settings in options.values() for k in settings))
            defaults = method_defaults(experiment.fixed.get("method", "dense"))
            experiment.groups[group] = {n: {k: settings.get(k, defaults.get(k)) for k in keys}
                                        for n, settings in options.items()}
            experiment.dims.append([{group: n, **settings} for n, settings in experiment.groups[group].items()])
        else:
            experiment.dims.append([{key: hashable(v)} for v in values])
        for alternative in experiment.dims[-1]:
            for axis in alternative:
                experiment.fixed.pop(axis, None)
    return experiment


def normalize(cell: dict) -> dict | None:
    """dense has no ratio (0 %), no method parameters and the reducer's default settings (config.REDUCER_KEYS: the
    schedule, the reduction layers, the trapezoid; also where a sweep says nothing); no pruner means sparsity 0; a
    reduction method at ratio 0, or a pruner at sparsity 0, is not a run (None); a method run without a ratio (one that
    removes no token: LongMamba's filter) is at 0 %, as its records are."""
    cell = {**REDUCER_KEYS, **cell}
    if cell.get("method") == "dense":
        cell = {k: v for k, v in cell.items() if not k.startswith("method.") and k != "layers"}
        cell.update(REDUCER_KEYS, ratio=0.0)
    elif "method" in cell and cell.get("ratio") in (0, 0.0):
        return None
    elif "method" in cell and cell.get("ratio") is None:
        cell["ratio"] = 0.0
    if cell.get("ratio") is not None:
        cell["ratio"] = round(float(cell["ratio"]), 6)
    if cell.get("pruner") == "none":
        cell["sparsity"] = 0.0
    elif "pruner" in cell and cell.get("sparsity") in (0, 0.0):
        return None
    return cell


def produces(experiment: Experiment, row: dict) -> bool:
    """The sweep has the record's settings and runs its value of every axis it sweeps (its model's and seed aside)."""
    return matches(row, experiment) and all(value(row, a) in experiment.values(a) for a in experiment.swept
                                            if a not in ("model", "seed") and not a.startswith("+"))


def matches(row: dict, experiment: Experiment, axes: tuple = ()) -> bool:
    """The record has the sweep's fixed settings, and changes from the defaults only what the sweep (or the
    table's row axes) vary. Seeds, limits and results versions are `admission`'s."""
    fixed = {a: v for a, v in experiment.fixed.items() if a not in NOT_MATCHED}
    if fixed.get("method", row["method"]) != row["method"]:
        return False
    cell = normalize({**fixed, "method": row["method"]})  # dense: no ratio, no method parameters
    if cell is None or any(value(row, a) != v for a, v in cell.items() if a in fixed and a != "method"):
        return False
    if any(a in experiment.swept and value(row, a) not in experiment.values(a) for a in CLOSED):
        return False
    return set(row["variant"]) <= set(experiment.swept) | set(experiment.fixed) | set(axes)


def admission(row: dict, experiments: list[Experiment], include_limited: bool = False,
              results_version: int | str | None = None) -> str | None:
    """Why a record that belongs to the table stays out of its cells (None: it enters): run on a subset of the
    documents (benchmark.limit), with a seed none of the sweeps runs, by another results version than
    `results_version` (an int, or "any"; default: the current config.RESULTS_VERSION), or on another bundled
    model or task than this package's (its stored run key is not its config's now)."""
    wanted = RESULTS_VERSION if results_version is None else results_version
    limit = value(row, "limit")  # pandas holds a column of limits and None as floats and NaN
    if limit is not None and not include_limited:
        return f"limited to {int(limit)} documents per task (benchmark.limit; --include-limited)"
    seeds = {s for e in experiments for s in e.values("seed")}
    if row["seed"] not in seeds:
        return f"seed {row['seed']}, not the sweep's ({', '.join(map(str, sorted(seeds)))})"
    if wanted != "any" and row["results_version"] != int(wanted):
        return f"results version {row['results_version']}, not {wanted} (--results-version)"
    if row.get("stale_key"):
        return "run on other contents of a bundled model or task than this package's (its run key differs)"
    return None


def expected_keys(experiments: list[Experiment], axes: tuple, split: dict, models: list[str],
                  rows: list[dict] = ()) -> list[tuple]:
    """Each model's cells of the sweep that names it with this benchmark (a model no sweep names: the first
    sweep's grid, without its model-specific values such as layer indices). A swept value some run of the table
    has (a ratio, a pruner) joins the grid: its block shows every other row too, missing ones as missing."""
    keys = []
    for model in models:
        own = [e for e in experiments if model in e.values("model")
               and e.fixed.get("benchmark") in (None, split.get("benchmark", e.fixed.get("benchmark")))]
        for experiment in own or experiments[:1]:
            skip = {"model", "seed"} | (set() if own else set(MODEL_SPECIFIC))
            # runs of another choice than the sweep's, fixed (trapezoid=none beside kept) or swept (rotation=kept
            # beside positions and sizes), do not extend its grid
            extending = [r for r in rows if all(value(r, k) == v for k, v in experiment.fixed.items() if k in CLOSED)
                         and all(value(r, k) in experiment.values(k) for k in REDUCER_KEYS if k in experiment.swept)
                         # nor do the runs another of the table's sweeps makes (LongMamba's, which has no ratio)
                         and (produces(experiment, r) or not any(produces(e, r) for e in experiments
                                                                  if e is not experiment))]
            dims = []
            for alternatives in experiment.dims:
                axis = next(iter(alternatives[0])) if len(alternatives[0]) == 1 else None
                if any(set(alt) & skip for alt in alternatives):
                    continue
                if axis is not None and axis not in experiment.groups:
                    seen = [alt[axis] for alt in alternatives]
                    alternatives = [{axis: v} for v in dict.fromkeys(seen + [value(r, axis) for r in extending])]
                dims.append(alternatives)
            for combo in itertools.product(*dims):
                cell = {**experiment.fixed, "model": model}
                for alternative in combo:
                    cell.update(alternative)
                cell = normalize(cell)
                if cell is not None:
                    keys.append(tuple(value(cell, axis) for axis in axes))
    return list(dict.fromkeys(keys))


def base_split(experiment: Experiment, model: str) -> dict:
    """The split values a sweep's expected rows of `model` have before any record says more."""
    return dict(benchmark=experiment.fixed.get("benchmark"), mamba_version=model_mamba_version(model),
                protocol=experiment.fixed.get("protocol", "exact"), device=None, shape=None)
