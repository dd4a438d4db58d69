"""The paper's tables from the results store (and, optionally, W&B), as Markdown and LaTeX.

    python -m ssmcompress.tables [--results results] [--out results/tables] [--wandb entity/project]

Each table is drawn from sweeps in experiments/ (main.yaml -> Tables 1/2, ablation_importance.yaml -> Table 3,
ablation_location*.yaml -> 4, ablation_design.yaml -> 5, ablation_share.yaml, efficiency.yaml, schedule.yaml,
positional.yaml, and #8's pruning.yaml / pruning_joint.yaml): a sweep's grid is the rows its table must have, so a
run that has not finished (or failed) is shown as "–" and counted under the table, never dropped; runs in the store
beyond the grid (a hub
model, another ratio) are added. A record belongs to a table when it has the sweep's fixed settings and every
setting it changes from the defaults (a method parameter, the reduction layers, a pruner) is one the sweep varies,
so one run (UTR at 20 %) fills its cell in Tables 1, 3 and 4 alike: records are matched by content, not by tag,
and a config run twice (same key) counts once, the latest. Tables are split by benchmark (its tasks are the
columns: perplexities first, each task's `main_metric`, Avg) and evaluation protocol; the main table also by model
generation, the efficiency table by device. Best per column (per model x budget block) is bold.
"""
from __future__ import annotations

import argparse
import functools
import itertools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd
from omegaconf import OmegaConf

from ssmcompress import tracking
from ssmcompress.config import CONF_DIR, EXPERIMENTS, register_resolvers
MISSING = "–"
SECTIONS = ("metrics", "headline", "flops", "efficiency", "timings", "pruning", "reduction")
GROUPS = ("model", "benchmark", "method", "pruner")  # config groups an experiment selects in its defaults list
SCALARS = ("ratio", "layers", "schedule", "sparsity", "protocol")  # top-level settings an experiment may fix
NUMERIC = ("ratio", "sparsity")  # rows in increasing order (0 = dense first); other axes in the sweep's order
MODEL_SPECIFIC = ("layers",)  # sweep values that fit only the sweep's own models (layer indices)
FREE = ("protocol", "device", "shape")  # splits a sweep does not pin: its expected rows join every such table of the records
# extra metrics shown before the accuracies (smaller is better), with their column suffix
LOWER = {"perplexity": "PPL", "ppl": "PPL", "word_perplexity": "word PPL", "byte_perplexity": "byte PPL",
         "bits_per_byte": "bits/byte"}
TASKS = {"lambada_openai": "LAMBADA", "hellaswag": "HellaSwag", "piqa": "PIQA", "arc_easy": "ARC-E",
         "arc_challenge": "ARC-C", "winogrande": "WinoGrande", "shakespeare_lastword": "Lastword",
         "shakespeare_continuation": "Continuation", "mqar": "MQAR", "story_qa": "StoryQA",
         "shakespeare_ppl": "Held-out"}
METHODS = {"ours": "UTR (ours)", "official": "UTR (official code)", "evit": "EViT", "pumer": "PuMer",
           "tome": "ToMe", "random": "random", "prune_only": "prune only", "merge_only": "merge only",
           "early": "early", "early_merge": "early, merged", "strided": "strided", "late": "late",
           "ceiling": "ceiling (cut only)"}
HEADERS = {"ratio": "FLOPs↓", "design": "hidden / residual", "method.importance": "metric"}
VALUES = {"method.importance": {"l1": "ℓ1-norm", "l2": "ℓ2-norm", "raw": "w/o Clip", "clip": "Clip (ours)"}}


# ---------------------------------------------------------------- records -> one flat row per run

def load_records(results_dir: str | Path, wandb_path: str | None = None, api=None) -> list[dict]:
    """The local store's records, plus (with `wandb_path` = "entity/project") those of the W&B project."""
    records = [dict(record, source="local") for record in tracking.load(results_dir)]
    if wandb_path:
        records += records_from_wandb(wandb_path, api)
    return records


def records_from_wandb(path: str, api=None) -> list[dict]:
    """Records rebuilt from W&B runs (public API): config = the resolved config, summary = the record's numbers
    as tracking.WandbLogger logs them ("headline/<task>", "flops/achieved_ratio", ...) and the run key."""
    if api is None:
        import wandb

        api = wandb.Api()
    records = []
    for run in api.runs(path):
        summary = dict(getattr(run.summary, "_json_dict", None) or run.summary)
        if "key" not in summary:
            continue  # not a run of ours
        config = {k: v["value"] if isinstance(v, dict) and set(v) <= {"value", "desc"} and "value" in v else v
                  for k, v in dict(run.config).items()}
        record = dict(key=summary["key"], run_id=run.id, time=str(getattr(run, "created_at", "") or ""),
                      config=config, source="wandb")
        for name, value in summary.items():
            section, _, rest = name.partition("/")
            if section in SECTIONS and rest:
                if section == "headline":  # headline keys are flat ("task/perplexity")
                    record.setdefault(section, {})[rest] = value
                else:
                    tree = record.setdefault(section, {})
                    *parents, leaf = rest.split("/")
                    for part in parents:
                        tree = tree.setdefault(part, {})
                    tree[leaf] = value
        records.append(record)
    return records


def flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(flatten(value, name))
        else:
            out[name] = _hashable(value)
    return out


def _hashable(value):
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    if hasattr(value, "text") and not isinstance(value, str):  # Hydra's QuotedString
        return value.text
    return value


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
    """What conf/config.yaml selects when a sweep says nothing: {"model": "mamba2-tiny", "method": "dense", ...}."""
    raw = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "config.yaml"), resolve=False)
    chosen = {k: v for item in raw.get("defaults", []) if isinstance(item, dict) for k, v in item.items()}
    return {**{g: chosen[g] for g in GROUPS if g in chosen}, "protocol": raw.get("protocol", "exact")}


def method_defaults(name: str) -> dict:
    """The literal (non-interpolated) parameters of a method's config, flat: {"method.importance": "clip"}."""
    option = group_option("method", name) or {}
    return {k: v for k, v in flatten(option, "method").items()
            if k != "method.name" and not (isinstance(v, str) and "${" in v)}


def generation(model: str, config: dict | None = None, info: dict | None = None) -> int | None:
    if info and info.get("generation"):
        return int(info["generation"])
    config = config or (group_option("model", model) or {}).get("config") or {}
    layer = (config.get("ssm_cfg") or {}).get("layer")
    return None if layer is None else (2 if layer == "Mamba2" else 1)


def to_row(record: dict) -> dict:
    """A record as flat columns: the axes (named as Hydra overrides), the method's parameters ("method.q"), the
    settings it changes from the defaults ("variant"), and the record's sections as they are."""
    config = record.get("config") or {}
    method = record.get("method") or (config.get("method") or {}).get("name")
    pruner = record.get("pruner") or (config.get("pruner") or {}).get("name") or "none"
    benchmark = config.get("benchmark") or {}
    model = config.get("model") or {}
    env = record.get("env") or {}
    row = dict(key=record.get("key"), run_id=record.get("run_id"), time=record.get("time"),
               source=record.get("source", "local"), tag=record.get("tag", config.get("tag")),
               model=record.get("model") or model.get("name"),
               benchmark=record.get("benchmark") or benchmark.get("name"), kind=benchmark.get("kind"),
               protocol=record.get("protocol") or config.get("protocol") or "exact",
               seed=record.get("seed", config.get("seed")), method=method, pruner=pruner,
               device=(record.get("efficiency") or {}).get("device_name") or env.get("gpu") or env.get("cpu")
               or env.get("device"))
    row["generation"] = generation(row["model"], model.get("config"), record.get("model_info"))
    row["family"] = model.get("family") or (record.get("model_info") or {}).get("family") or "mamba"
    efficiency = record.get("efficiency") or {}
    row["shape"] = f"batch {efficiency['batch_size']} x {efficiency['length']}" if efficiency else None
    dense = method == "dense"
    ratio = None if dense else record.get("ratio", config.get("ratio"))
    row["ratio"] = 0.0 if ratio is None else round(float(ratio), 6)
    row["layers"] = None if dense else _hashable(record.get("layers", config.get("layers")))
    row["schedule"] = config.get("schedule") or "smooth"  # records older than the key: smooth
    row["sparsity"] = 0.0 if pruner == "none" else _hashable(record.get("sparsity", config.get("sparsity")))
    params = {k: v for k, v in flatten(config.get("method") or {}, "method").items() if k != "method.name"}
    row.update(params)
    defaults = method_defaults(method) if method else {}
    variant = [k for k, v in params.items() if k in defaults and v != defaults[k]]
    variant += ["layers"] * (row["layers"] is not None) + ["pruner", "sparsity"] * (pruner != "none")
    variant += ["schedule"] * (row["schedule"] != "smooth" and not dense)
    row["variant"] = tuple(sorted(variant))
    row["tasks"] = tuple(benchmark.get("tasks") or ())
    row["extra_metrics"] = benchmark.get("extra_metrics") or {}
    row["main_metric"] = benchmark.get("main_metric") or {}
    for section in SECTIONS:
        row[section] = record.get(section) or {}
    return row


def frame(records: list[dict]) -> pd.DataFrame:
    """One row per distinct run key; the latest record wins (a config run twice counts once, never twice)."""
    rows = [to_row(record) for record in records]
    df = pd.DataFrame(rows, columns=list(dict.fromkeys(k for row in rows for k in row)) or ["key", "time", "source"])
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


# ---------------------------------------------------------------- sweeps: the rows each table must have

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
                         if all(_value(row, k) == v for k, v in settings.items())), None)
            if name is None:
                keys = list(next(iter(options.values())))
                name = ", ".join(f"{k.split('.')[-1]}={_value(row, k)}" for k in keys)
            row = {**row, group: name}
        return row


def _settings(raw: dict) -> dict:
    """The axis settings of an experiment file (or of one option of a nested group of experiments/)."""
    fixed = {}
    for item in raw.get("defaults") or []:
        if isinstance(item, dict):
            for key, value in item.items():
                key = key.replace("override", "").strip().lstrip("/")
                if key in GROUPS:
                    fixed[key] = value
    fixed.update({k: raw[k] for k in SCALARS if k in raw})
    fixed.update(flatten({k: v for k, v in (raw.get("method") or {}).items() if k != "name"}, "method"))
    return {k: _hashable(v) for k, v in fixed.items()}


def load_experiment(name: str) -> Experiment:
    """experiments/<name>.yaml: fixed settings from its defaults list and keys (else conf/config.yaml's), swept
    ones from hydra.sweeper.params (Hydra's override grammar; `+experiment/<group>: a,b` sweeps nested options)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    raw = OmegaConf.to_container(OmegaConf.load(EXPERIMENTS / f"{name}.yaml"), resolve=False)
    experiment = Experiment(name, {**primary_defaults(), **_settings(raw)})
    parser = OverridesParser.create()
    for key, value in (((raw.get("hydra") or {}).get("sweeper") or {}).get("params") or {}).items():
        override = parser.parse_override(f"{key}={value}")
        values = override.value().list if override.is_choice_sweep() else [override.value()]
        key = override.key_or_group.lstrip("+~")
        if key.startswith("experiment/"):
            group = key.split("/", 1)[1]
            options = {str(v): _settings(OmegaConf.to_container(OmegaConf.load(EXPERIMENTS / group / f"{v}.yaml"),
                                                                resolve=False)) for v in values}
            keys = list(dict.fromkeys(k for settings in options.values() for k in settings))
            defaults = method_defaults(experiment.fixed.get("method", "dense"))
            experiment.groups[group] = {n: {k: settings.get(k, defaults.get(k)) for k in keys}
                                        for n, settings in options.items()}
            experiment.dims.append([{group: n, **settings} for n, settings in experiment.groups[group].items()])
        else:
            experiment.dims.append([{key: _hashable(v)} for v in values])
        for alternative in experiment.dims[-1]:
            for axis in alternative:
                experiment.fixed.pop(axis, None)
    return experiment


def normalize(cell: dict) -> dict | None:
    """dense has no ratio (0 %) and no method parameters; no pruner means sparsity 0; a reduction method at
    ratio 0, or a pruner at sparsity 0, is not a run (None)."""
    cell = dict(cell)
    if cell.get("method") == "dense":
        cell = {k: v for k, v in cell.items() if not k.startswith("method.") and k != "layers"}
        cell["ratio"] = 0.0
    elif "method" in cell and cell.get("ratio") in (0, 0.0):
        return None
    if cell.get("ratio") is not None:
        cell["ratio"] = round(float(cell["ratio"]), 6)
    if cell.get("pruner") == "none":
        cell["sparsity"] = 0.0
    elif "pruner" in cell and cell.get("sparsity") in (0, 0.0):
        return None
    return cell


def _value(row: dict, axis: str):
    value = row.get(axis)
    return None if isinstance(value, float) and math.isnan(value) else value


def matches(row: dict, experiment: Experiment, axes: tuple = ()) -> bool:
    """The record has the sweep's fixed settings, and changes from the defaults only what the sweep (or the
    table's row axes) vary."""
    fixed = {a: v for a, v in experiment.fixed.items() if a not in FREE + ("model", "benchmark")}
    if fixed.get("method", row["method"]) != row["method"]:
        return False
    cell = normalize({**fixed, "method": row["method"]})  # dense: no ratio, no method parameters
    if cell is None or any(_value(row, a) != v for a, v in cell.items() if a in fixed and a != "method"):
        return False
    return set(row["variant"]) <= set(experiment.swept) | set(experiment.fixed) | set(axes)


# ---------------------------------------------------------------- columns

@dataclass
class Column:
    header: str
    fmt: str                   # acc: x100, one decimal (the paper's %); num: two decimals (from 1e6: 1.80e+07);
                               # pct: x100 with " %"
    better: str | None         # higher | lower | None (no highlighting)
    get: Callable[[dict], float | None]


def _number(value):
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) and not (
        isinstance(value, float) and math.isnan(value)) else None


def accuracy_columns(tasks: list[str], extras: dict, main: dict | None = None) -> list[Column]:
    """Perplexities first (as LAMBADA PPL in the paper), then each task's headline metric, then Avg.
    A task without a main metric (`main` given; #8's held-out perplexity) has only its perplexity columns."""
    scored = [t for t in tasks if main is None or t in main]

    def metric(name):
        return lambda row: _number(row["headline"].get(name))

    def average(row):  # over the table's tasks: a run on fewer tasks has no comparable average
        values = [_number(row["headline"].get(t)) for t in scored]
        return None if not values or None in values else sum(values) / len(values)

    columns = [Column(f"{TASKS.get(t, t)} {LOWER[m]}", "num", "lower", metric(f"{t}/{m}"))
               for t in tasks for m in extras.get(t, []) if m in LOWER]
    columns += [Column(TASKS.get(t, t), "acc", "higher", metric(t)) for t in scored]
    return columns + [Column("Avg", "acc", "higher", average)]


def _efficiency(name: str):
    """The reduced forward's number (a dense run has only the dense forward's)."""
    return lambda row: _number(row["efficiency"].get(f"reduced_{name}", row["efficiency"].get(f"dense_{name}")))


def _dense_default(name: str, value: float):
    return lambda row: _number(row["efficiency"].get(name, value if row["method"] == "dense" else None))


# #5's record fields (ssmcompress.metrics.efficiency.measure); the speed-up is dense / reduced in the same process
EFFICIENCY_COLUMNS = [
    Column("FLOPs↓ achieved", "pct", None, lambda row: _number(row["flops"].get("achieved_ratio"))),
    Column("latency ms", "num", "lower", _efficiency("latency_ms")),
    Column("tokens/s", "num", "higher", _efficiency("tokens_per_s")),
    Column("peak MiB", "num", "lower", _efficiency("peak_mib")),
    Column("activation MiB", "num", "lower", _efficiency("activation_mib")),
    Column("speed-up", "num", "higher", _dense_default("speedup", 1.0)),
    # the speed-up over the FLOPs-ideal 1 / (1 - achieved ratio): 100 % = time falls exactly as FLOPs do
    Column("of ideal", "pct", "higher", lambda row: _number(
        row["efficiency"]["speedup"] * (1 - row["flops"]["achieved_ratio"]) if "speedup" in row["efficiency"]
        else None)),
    # the speed-up over the ceiling's (the cut alone at the same counts, timed beside it): what the method keeps
    Column("of ceiling", "pct", "higher", lambda row: _number(row["efficiency"].get("of_ceiling"))),
    Column("overhead", "pct", "lower", _dense_default("reduction_overhead", 0.0)),  # reduction's own time / dense
    Column("peak memory saving", "pct", "higher", _dense_default("peak_memory_saving", 0.0)),
]


def fmt(value, kind: str) -> str:
    if value is None:
        return MISSING
    if kind == "acc":
        return f"{100 * value:.1f}"
    if kind == "pct":
        return f"{100 * value:.1f} %"
    return f"{value:.2f}" if abs(value) < 1e6 else f"{value:.2e}"  # a diverged perplexity stays readable


def axis_label(axis: str, value) -> str:
    if axis == "ratio":
        return f"{100 * value:g} %"
    if axis == "sparsity":
        return "0 %" if value in (0, None) else (f"{100 * value:g} %" if isinstance(value, float) else str(value))
    if axis == "method":
        return METHODS.get(value, str(value))
    if axis == "layers":
        return "default" if value is None else "[" + ",".join(str(v) for v in value) + "]"
    if axis == "design":  # option names of experiments/design: <hidden>_<residual>, e.g. q0.5_M-only
        return " / ".join(f"q = {part[1:]}" if part[:1] == "q" else part for part in str(value).split("_"))
    if value in VALUES.get(axis, {}):
        return VALUES[axis][value]
    return MISSING if value is None else str(value)


def header(axis: str) -> str:
    return HEADERS.get(axis, axis.split(".")[-1])


# ---------------------------------------------------------------- tables

@dataclass
class Spec:
    name: str
    title: str
    experiments: tuple                 # experiments/<name>.yaml: the sweeps whose grid gives the expected rows
    kind: str = "accuracy"             # accuracy | efficiency
    axes: tuple | None = None          # row axes, outer to inner (None: model, ratio, then what the sweeps vary)
    block: int = 2                     # leading axes forming a block, for best-per-column highlighting
    split: tuple = ("benchmark", "protocol")
    numbers: dict = field(default_factory=dict)  # the paper's numbering: {generation: "Table 1"} or {None: ...}
    family: str = "mamba"              # the model family of its records (mamba-ssm or hf: transformers)


SPECS = [
    Spec("main", "Main accuracy", ("main",), split=("benchmark", "protocol", "generation"),
         numbers={2: "Table 1", 1: "Table 2"}),
    Spec("importance", "Importance metric", ("ablation_importance",), numbers={None: "Table 3"}),
    Spec("location", "Reduction location", ("ablation_location", "ablation_location_hub"), numbers={None: "Table 4"}),
    Spec("design", "Hidden-state / residual design", ("ablation_design",), numbers={None: "Table 5"}),
    Spec("share", "Prune vs merge share", ("ablation_share",)),
    Spec("efficiency", "Efficiency", ("efficiency",), kind="efficiency", split=("device", "shape")),
    Spec("schedule", "Smooth vs chunk-multiple token counts", ("schedule",)),
    Spec("positional", "Positional baselines", ("positional",), split=("benchmark", "protocol", "generation")),
    Spec("pruning", "Weight pruning", ("pruning",), axes=("model", "sparsity", "pruner")),
    Spec("pruning_hf", "Weight pruning (transformer)", ("pruning_hf",), axes=("model", "sparsity", "pruner"),
         family="hf"),
    Spec("joint", "Weight pruning and token reduction", ("pruning_joint",),
         axes=("model", "pruner", "sparsity", "ratio", "method"), block=4),
]


@dataclass
class Table:
    name: str
    title: str
    frame: pd.DataFrame                # display strings: the row axes, then the value columns
    bold: pd.DataFrame                 # same shape: True where a cell is the best of its block
    values: pd.DataFrame               # the numbers behind the value columns (None where missing)
    n_expected: int
    n_missing: int
    axes: tuple = ()
    notes: list[str] = field(default_factory=list)

    def footer(self) -> str:
        return "\n".join([f"Missing: {self.n_missing} of {self.n_expected} runs (shown as {MISSING})."] + self.notes)

    def markdown(self) -> str:
        cells = self.frame.mask(self.bold, "**" + self.frame + "**")
        return f"### {self.title}\n\n{cells.to_markdown(index=False, disable_numparse=True)}\n\n{self.footer()}\n"

    def latex(self) -> str:
        """A booktabs table (\\usepackage{booktabs}), with a rule between models as in the paper."""
        cells = self.frame.map(latex_escape)
        cells = cells.mask(self.bold, "\\textbf{" + cells + "}")
        n = len(self.axes)
        lines = ["\\begin{table}[t]", "\\centering", f"\\caption{{{latex_escape(self.title)}}}",
                 f"\\label{{tab:{self.name}}}", f"\\begin{{tabular}}{{{'l' * n}{'r' * (cells.shape[1] - n)}}}",
                 "\\toprule", " & ".join(latex_escape(c) for c in cells.columns) + " \\\\", "\\midrule"]
        for i, row in enumerate(cells.itertuples(index=False)):
            if i and row[0]:
                lines.append("\\midrule")
            lines.append(" & ".join(row) + " \\\\")
        lines += ["\\bottomrule", "\\end{tabular}", "\\end{table}"]
        return "\n".join(lines) + "\n" + "".join(f"% {latex_escape(line)}\n" for line in self.footer().splitlines())


LATEX = {"\\": "\\textbackslash{}", "&": "\\&", "%": "\\%", "_": "\\_", "#": "\\#", "$": "\\$", "{": "\\{",
         "}": "\\}", "~": "\\textasciitilde{}", "^": "\\textasciicircum{}", "↓": "$\\downarrow$", "×": "$\\times$",
         "ℓ": "$\\ell$", MISSING: "--"}


def latex_escape(text) -> str:
    return "".join(LATEX.get(char, char) for char in str(text))


def experiments_of(spec: Spec) -> list[Experiment]:
    return [load_experiment(name) for name in spec.experiments if (EXPERIMENTS / f"{name}.yaml").exists()]


def build(df: pd.DataFrame, specs: list[Spec] | None = None) -> list[Table]:
    """Every table with expected rows or matching records, split by benchmark/protocol/... (see the module doc)."""
    return [table for spec in (specs or SPECS) for table in build_spec(df, spec)]


def build_spec(df: pd.DataFrame, spec: Spec) -> list[Table]:
    experiments = experiments_of(spec)
    if not experiments:
        return []
    grouped = set().union(*(e.grouped for e in experiments))
    swept = [k for e in experiments for k in e.swept if k not in ("model", "benchmark", "protocol", "ratio")
             and k not in grouped]
    axes = tuple(spec.axes or ("model", "ratio", *dict.fromkeys(swept)))
    interesting = {k for e in experiments for k in e.swept} - {"model", "benchmark", "protocol", "method", "ratio"}

    rows = []
    for row in df.to_dict("records"):
        wanted = (row["kind"] == "efficiency" and row["efficiency"]) if spec.kind == "efficiency" else \
            (row["kind"] != "efficiency" and row["headline"])
        wanted = wanted and row["family"] == spec.family
        if wanted and any(matches(row, e, axes) for e in experiments):
            for experiment in experiments:
                row = experiment.label_groups(row)
            rows.append(row)

    # the tables (splits): those the records make, and the sweeps' own for their models
    splits: dict[tuple, dict] = {}
    for row in rows:
        if not interesting or set(row["variant"]) & interesting:  # an ablation's table needs an ablated run
            splits.setdefault(tuple(row[s] for s in spec.split), {}).setdefault(row["model"], [])
    observed = list(splits)
    # the first sweep's rows are expected always; another's (a hub variant) once one of its models has a run
    seen = {r["model"] for r in rows}
    for experiment in experiments[:1] + [e for e in experiments[1:] if seen & set(e.values("model"))]:
        for model in experiment.values("model"):
            base = dict(benchmark=experiment.fixed.get("benchmark"), generation=generation(model),
                        protocol=experiment.fixed.get("protocol", "exact"), device=None, shape=None)
            targets = [split for split in observed
                       if all(v == base[s] for s, v in zip(spec.split, split) if s not in FREE)]
            if spec.kind == "efficiency" and targets:  # a device's table lists the models measured there
                continue
            for split in targets or [tuple(base[s] for s in spec.split)]:
                splits.setdefault(split, {}).setdefault(model, [])
    for row in rows:
        models = splits.get(tuple(row[s] for s in spec.split), {})
        if row["model"] in models:
            models[row["model"]].append(row)

    tables = []
    for split, models in sorted(splits.items(), key=lambda item: tuple(str(v) for v in item[0])):
        tables.append(assemble(spec, experiments, axes, dict(zip(spec.split, split)), models))
    return tables


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
            skip = {"model"} | (set() if own else set(MODEL_SPECIFIC))
            dims = []
            for alternatives in experiment.dims:
                axis = next(iter(alternatives[0])) if len(alternatives[0]) == 1 else None
                if any(set(alt) & skip for alt in alternatives):
                    continue
                if axis is not None and axis not in experiment.groups:
                    seen = [alt[axis] for alt in alternatives]
                    alternatives = [{axis: v} for v in dict.fromkeys(seen + [_value(r, axis) for r in rows])]
                dims.append(alternatives)
            for combo in itertools.product(*dims):
                cell = {**experiment.fixed, "model": model}
                for alternative in combo:
                    cell.update(alternative)
                cell = normalize(cell)
                if cell is not None:
                    keys.append(tuple(_value(cell, axis) for axis in axes))
    return list(dict.fromkeys(keys))


def model_size(name: str) -> float:
    """Parameters in billions from a name such as mamba2-370m or mamba-2.8b (inf when the name has none), so that
    models no sweep lists appear smallest first."""
    match = re.search(r"(\d+(?:\.\d+)?)([mb])$", str(name))
    return float(match.group(1)) * (1e-3 if match.group(2) == "m" else 1.0) if match else float("inf")


def _rank(value, order: list):
    if value in order:
        return (0, order.index(value), "")
    if isinstance(value, (int, float)):
        return (1, value, "")
    return (1 if value is None else 2, 0, str(value))


def assemble(spec: Spec, experiments: list[Experiment], axes: tuple, split: dict, models: dict) -> Table:
    rows = [row for records in models.values() for row in records]
    model_order = [m for e in experiments for m in e.values("model")]
    models = sorted(models, key=lambda m: (_rank(m, model_order)[:2], model_size(m), m))
    keys = expected_keys(experiments, axes, split, models, rows)
    found: dict[tuple, list] = {}
    for row in rows:
        found.setdefault(tuple(_value(row, axis) for axis in axes), []).append(row)
    keys += [key for key in found if key not in keys]
    orders = {axis: [] if axis in NUMERIC else [_hashable(v) for e in experiments for v in e.values(axis)]
              for axis in axes}
    orders["model"] = models
    if "method" in orders:
        orders["method"] = ["dense"] + [m for m in orders["method"] if m != "dense"]
    keys.sort(key=lambda key: [_rank(value, orders[axis]) for axis, value in zip(axes, key)])

    chosen, notes = {}, []
    for key in keys:
        candidates = found.get(key, [])
        if len(candidates) > 1:
            label = ", ".join(f"{header(a)} {axis_label(a, v)}" for a, v in zip(axes, key))
            notes.append(f"{label}: {len(candidates)} runs with other settings (seed, limit, ...); the latest shown.")
        chosen[key] = max(candidates, key=lambda r: str(r["time"])) if candidates else None

    if spec.kind == "efficiency":
        columns = EFFICIENCY_COLUMNS
        shapes = sorted({f"{r['efficiency'].get('batch_size')}x{r['efficiency'].get('length')}" for r in rows})
        notes += [f"Input shape (batch x length): {', '.join(shapes)}."] if shapes else []
    else:
        tasks, extras, main = [], {}, {}
        for row in rows:
            tasks += [t for t in row["tasks"] if t not in tasks]
            extras.update(row["extra_metrics"])
            main.update(row.get("main_metric") or {})
        if not tasks:
            option = group_option("benchmark", split.get("benchmark") or primary_defaults()["benchmark"]) or {}
            tasks, extras = list(option.get("tasks") or []), option.get("extra_metrics") or {}
            main = option.get("main_metric") or {}
        columns = accuracy_columns(tasks, extras, main or None)

    values = pd.DataFrame([[c.get(chosen[k]) if chosen[k] is not None else None for c in columns] for k in keys],
                          columns=[c.header for c in columns], dtype=object)
    shown = pd.DataFrame({c.header: [fmt(v, c.fmt) for v in values[c.header]] for c in columns},
                         index=values.index)
    labels = pd.DataFrame([[axis_label(a, v) for a, v in zip(axes, key)] for key in keys],
                          columns=[header(a) for a in axes])
    bold = pd.DataFrame(False, index=shown.index, columns=shown.columns)
    blocks = pd.Series([str(key[:spec.block]) for key in keys], index=shown.index)
    for column in columns:
        if column.better is None:
            continue
        printed = pd.to_numeric(shown[column.header].str.rstrip(" %"), errors="coerce")  # ties as printed
        for _, index in printed.groupby(blocks).groups.items():
            block = printed.loc[index].dropna()
            if block.nunique() > 1:
                best = block.min() if column.better == "lower" else block.max()
                bold.loc[block.index[block == best], column.header] = True
    # the block's axes are printed on the first row of their group only
    repeats = [labels.iloc[:, : i + 1].eq(labels.iloc[:, : i + 1].shift()).all(axis=1).to_numpy()
               for i in range(min(spec.block, len(axes) - 1))]
    for i, repeat in enumerate(repeats):
        labels.iloc[repeat, i] = ""
    return Table(name=table_name(spec, split), title=table_title(spec, experiments, axes, split),
                 frame=pd.concat([labels, shown], axis=1),
                 bold=pd.concat([pd.DataFrame(False, index=labels.index, columns=labels.columns), bold], axis=1),
                 values=values, n_expected=len(keys), n_missing=sum(chosen[k] is None for k in keys), axes=axes,
                 notes=notes)


def table_name(spec: Spec, split: dict) -> str:
    parts = [spec.name]
    for name, value in split.items():
        if name == "generation":
            parts.append({1: "mamba", 2: "mamba2"}.get(value, "other"))
        elif value is not None and value != spec.name and not (name == "protocol" and value == "exact"):
            parts.append("".join(c if c.isalnum() or c in "._-" else "-" for c in str(value)))
    return "_".join(parts)


def table_title(spec: Spec, experiments: list[Experiment], axes: tuple, split: dict) -> str:
    number = spec.numbers.get(split.get("generation"), spec.numbers.get(None))
    details = [{1: "Mamba", 2: "Mamba-2"}.get(split["generation"], "other")] if "generation" in split else []
    fixed = experiments[0].fixed
    details += [f"{header(a)} {axis_label(a, v)}" for a, v in fixed.items()
                if (a in ("method", "ratio") or a.startswith("method.")) and a not in axes]
    details += [f"{name} {value}" for name, value in split.items() if name != "generation" and value is not None]
    return (f"{number} — " if number else "") + spec.title + (f" ({', '.join(details)})" if details else "")


# ---------------------------------------------------------------- output

def write(tables: list[Table], out_dir: str | Path) -> list[Path]:
    """<name>.md and <name>.tex per table, and README.md listing them with how many runs each has. Tables the
    previous README listed that are not made now (a split that is gone) are removed, other files left alone."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    current = {f"{t.name}{suffix}" for t in tables for suffix in (".md", ".tex")}
    for name in previous_tables(out_dir) - current:
        (out_dir / name).unlink(missing_ok=True)
    paths = []
    for table in tables:
        for suffix, text in ((".md", table.markdown()), (".tex", table.latex())):
            path = out_dir / f"{table.name}{suffix}"
            path.write_text(text)
            paths.append(path)
    index = "\n".join(f"- [{t.title}]({t.name}.md) ([LaTeX]({t.name}.tex)): "
                      f"{t.n_expected - t.n_missing} of {t.n_expected} runs" for t in tables)
    (out_dir / "README.md").write_text("# Tables\n\nWritten by `make tables` (`python -m ssmcompress.tables`) from "
                                       f"the results store; {MISSING} marks a run not in the store.\n\n{index}\n")
    return paths


def previous_tables(out_dir: Path) -> set[str]:
    """The table files an earlier `write` listed in <out_dir>/README.md."""
    index = out_dir / "README.md"
    if not index.is_file():
        return set()
    return {name for name in re.findall(r"\]\(([^()/]+\.(?:md|tex))\)", index.read_text()) if name != "README.md"}


def main(argv=None) -> list[Table]:
    parser = argparse.ArgumentParser(prog="python -m ssmcompress.tables", description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default="results", help="results store directory (records.jsonl; default: the "
                        "committed store results/ of the checkout you run from)")
    parser.add_argument("--out", default=None, help="where the tables go (default: <results>/tables)")
    parser.add_argument("--wandb", default=None, metavar="ENTITY/PROJECT",
                        help="also read the runs of this W&B project (public API; needs network and a login)")
    args = parser.parse_args(argv)
    records = load_records(args.results, args.wandb)
    df = frame(records)
    tables = build(df)
    out = Path(args.out or Path(args.results) / "tables")
    write(tables, out)
    print(f"{len(records)} records from {args.results}" + (f" and W&B {args.wandb}" if args.wandb else "")
          + f" ({df.attrs['duplicates']} superseded by a later run of the same config)")
    for table in tables:
        print(f"  {table.name}: {table.n_expected - table.n_missing} of {table.n_expected} runs")
    print(f"wrote {2 * len(tables) + 1} files to {out}")
    return tables


def cli() -> None:
    """The console script `ssmcompress-tables` (= make tables)."""
    main()


if __name__ == "__main__":
    cli()
