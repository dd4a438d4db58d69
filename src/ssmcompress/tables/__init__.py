"""The paper's tables from the results store (and, optionally, W&B), as Markdown, LaTeX and the records behind them.

    python -m ssmcompress.tables [--results results] [--out results/tables] [--wandb entity/project]
                                 [--include-limited] [--results-version N|any]

Each table is drawn from sweeps in conf/experiment (`specs.SPECS`: main.yaml -> Tables 1/2, ablation_importance.yaml
-> 3, ablation_location*.yaml -> 4, ablation_design.yaml -> 5, ablation_share, efficiency, generation, memory,
schedule, positional, pruning*): the sweep's grid is the rows the table must have (`grid`), so a run that has not
finished is shown as "–" and counted, and runs in the store beyond the grid (a hub model, another ratio) are added.
A cell holds only records run as the sweep runs them: every document (no benchmark.limit, unless
--include-limited), the sweep's seeds (a sweep over seeds averages them), the current results version (unless
--results-version); the others are left out and listed. Tables are split by benchmark (its tasks are the columns:
perplexities first, each task's `main_metric`, Avg) and evaluation protocol; the main table also by model
generation, the efficiency tables by device and input shape. Accuracy cells show mean ± standard error; the best of
a block is bold only where a paired bootstrap over the documents says it beats the runner-up (`stats`), else the
leaders tied with it are marked alike. Every table's footer says which records it used; <name>.records.csv lists
them per cell.
"""
from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

import pandas as pd

from ssmcompress import records
from ssmcompress.config import EXPERIMENTS, RESULTS_VERSION
from ssmcompress.tables import stats
from ssmcompress.tables.grid import (FREE, Experiment, admission, base_split, expected_keys, load_experiment,
                                     matches, normalize, sweep_jobs)
from ssmcompress.tables.render import (BEST, METHODS, MISSING, TIED, Table, axis_label, fmt, header)
from ssmcompress.tables.sources import (frame, group_option, load_records, primary_defaults, records_from_wandb,
                                        to_row, value)
from ssmcompress.tables.specs import PAPER, SPECS, Column, Spec, accuracy_columns

__all__ = ["BEST", "EXPERIMENTS", "METHODS", "MISSING", "PAPER", "SPECS", "TIED", "Column", "Experiment", "Spec",
           "Table", "accuracy_columns", "build", "cli", "expected_keys", "fmt", "frame", "load_experiment",
           "load_records", "main", "matches", "normalize", "records_from_wandb", "sweep_jobs", "to_row", "write"]
NUMERIC = ("ratio", "sparsity")  # rows in increasing order (0 = dense first); other axes in the sweep's order
SPLIT_BY_SHAPE = "benchmark.measure.shape."  # a swept input shape makes tables (the `shape` split), not an ablation
RECORD_COLUMNS = ["cell", "status", "run_id", "key", "time", "commit", "seed", "results_version", "limit"]


def build(df: pd.DataFrame, specs: list[Spec] | None = None, include_limited: bool = False,
          results_version: int | str | None = None, directory: Path = EXPERIMENTS) -> list[Table]:
    """Every table with expected rows or matching records (see the module doc). `results_version`: the one the
    cells take (default: config.RESULTS_VERSION), or "any"; `directory`: where the sweep files are."""
    specs = specs or SPECS
    sweeps = {spec.name: _experiments(spec, directory) for spec in SPECS + specs}  # each spec's sweeps, read once
    pruning = set().union(*(sweep_benchmarks(e) for e in sweeps.values() if prunes(e)))
    owned = set().union(*(sweep_benchmarks(sweeps[spec.name]) for spec in SPECS + specs if "benchmark" in spec.closed))
    foreign = {name: set() if prunes(e) else (pruning | owned) - sweep_benchmarks(e) for name, e in sweeps.items()}
    return [table for spec in specs
            for table in build_spec(df, spec, sweeps[spec.name], include_limited, results_version, foreign[spec.name])]


def _experiments(spec: Spec, directory: Path) -> list[Experiment]:
    return [load_experiment(n, directory) for n in spec.experiments if (directory / f"{n}.yaml").exists()]


def sweep_benchmarks(experiments: list[Experiment]) -> set:
    """The benchmarks the sweeps fix."""
    return {e.fixed.get("benchmark") for e in experiments} - {None}


def prunes(experiments: list[Experiment]) -> bool:
    """Whether the sweeps prune weights (their benchmark is the pruning tables')."""
    return any("pruner" in e.swept or e.fixed.get("pruner", "none") != "none" for e in experiments)


def build_spec(df: pd.DataFrame, spec: Spec, experiments: list[Experiment], include_limited: bool = False,
               results_version=None, foreign: set = frozenset()) -> list[Table]:
    """The spec's tables from its sweeps (`experiments`). A table of a benchmark the sweeps do not run is made only
    from admitted records, and not for a `foreign` one (the pruning sweeps' benchmark, for a reduction table: it is
    the pruning tables', although its dense and reduction-only runs also have Table 1's settings; the benchmark of a
    spec that owns its sweeps' benchmark, as the long-context table its suite)."""
    if not experiments:
        return []
    grouped = set().union(*(e.grouped for e in experiments))
    swept = [k for e in experiments for k in e.swept if k not in ("model", "benchmark", "protocol", "ratio", "seed")
             and k not in grouped]
    axes = tuple(spec.axes or ("model", "ratio", *dict.fromkeys(swept)))
    interesting = {k for e in experiments for k in e.swept if not k.startswith(SPLIT_BY_SHAPE)} - {
        "model", "benchmark", "protocol", "method", "ratio", "seed"}

    rows = []  # the records that belong to the table, each with why it stays out of its cell (None: it enters)
    for row in df.to_dict("records"):
        if row["kind"] != spec.kind or not row[spec.section] or spec.family not in (None, row["family"]):
            continue
        if (spec.shapes and row["shape"] not in spec.shapes) or row["shape"] in spec.other_shapes:
            continue
        if row["captured"] != spec.captured:
            continue
        if spec.generations and row["mamba_version"] not in spec.generations:
            continue
        if not any(matches(row, e, axes) for e in experiments):
            continue
        if interesting and not set(row["variant"]) & interesting and not any(
                value(row, "ratio") in (None, 0, *e.values("ratio")) for e in experiments):
            continue  # an ablation's default run at a budget the ablation does not sweep (Table 1's 10 % UTR)
        for experiment in experiments:
            row = experiment.label_groups(row)
        rows.append(dict(row, reason=admission(row, experiments, include_limited, results_version)))

    # the tables (splits): those the records make, and the sweeps' own for their models
    splits: dict[tuple, dict] = {}
    closed = {axis: {v for e in experiments for v in e.values(axis)} for axis in spec.closed}
    for row in rows:
        if row["reason"] is not None or row["benchmark"] in foreign or any(row[a] not in v for a, v in closed.items()):
            continue
        if not interesting or set(row["variant"]) & interesting:  # an ablation's table needs an ablated run
            splits.setdefault(tuple(row[s] for s in spec.split), {}).setdefault(row["model"], [])
    observed = list(splits)
    # the first sweep's rows are expected always; another's (a hub variant) once one of its models has a run
    seen = {r["model"] for r in rows}
    for experiment in experiments[:1] + [e for e in experiments[1:] if seen & set(e.values("model"))]:
        for model in experiment.values("model"):
            base = base_split(experiment, model)
            targets = [split for split in observed
                       if all(v == base[s] for s, v in zip(spec.split, split) if s not in FREE)]
            if spec.kind != "lm_eval" and targets:  # a device's table: the sweep's models, if it measured one
                targets = [split for split in targets if set(splits[split]) & set(experiment.values("model"))]
                if not targets:
                    continue
            for split in targets or [tuple(base[s] for s in spec.split)]:
                splits.setdefault(split, {}).setdefault(model, [])
    for row in rows:
        models = splits.get(tuple(row[s] for s in spec.split), {})
        if row["model"] in models:
            models[row["model"]].append(row)
    context = dict(results_version=RESULTS_VERSION if results_version is None else results_version,
                   include_limited=include_limited)
    return [assemble(spec, experiments, axes, dict(zip(spec.split, split)), models, context)
            for split, models in sorted(splits.items(), key=lambda item: tuple(str(v) for v in item[0]))]


def model_size(name: str) -> float:
    """Parameters in billions from a name such as mamba2-370m or mamba-2.8b (inf when the name has none), so that
    models no sweep lists appear smallest first."""
    match = re.search(r"(\d+(?:\.\d+)?)([mb])$", str(name))
    return float(match.group(1)) * (1e-3 if match.group(2) == "m" else 1.0) if match else float("inf")


def _rank(found, order: list):
    if found in order:
        return (0, order.index(found), "")
    if isinstance(found, (int, float)):
        return (1, found, "")
    return (1 if found is None else 2, 0, str(found))


def _chosen(candidates: list[dict]) -> dict:
    """Of several records for one cell and seed: the newest results version, then the latest."""
    return max(candidates, key=lambda r: (r["results_version"], str(r["time"])))


def columns_of(spec: Spec, split: dict, rows: list[dict]) -> list[Column]:
    if spec.columns is not None:
        return spec.columns
    tasks, extras, main = [], {}, {}
    for row in rows:
        tasks += [t for t in row["tasks"] if t not in tasks]
        extras.update(row["extra_metrics"])
        main.update(row["main_metric"])
    if not tasks:
        option = group_option("benchmark", split.get("benchmark") or primary_defaults()["benchmark"]) or {}
        tasks, extras, main = list(option.get("tasks") or []), option.get("extra_metrics") or {}, \
            option.get("main_metric") or {}
    return accuracy_columns(tasks, extras, main or None)


def assemble(spec: Spec, experiments: list[Experiment], axes: tuple, split: dict, models: dict,
             context: dict) -> Table:
    rows = [row for model_rows in models.values() for row in model_rows]
    admitted = [row for row in rows if row["reason"] is None]
    model_order = [m for e in experiments for m in e.values("model")]
    models = sorted(models, key=lambda m: (_rank(m, model_order)[:2], model_size(m), m))
    keys = expected_keys(experiments, axes, split, models, admitted)
    keys += [k for k in dict.fromkeys(tuple(value(r, a) for a in axes) for r in admitted) if k not in keys]
    # an optional axis (the schedule) is shown only where the table's rows differ in it
    kept = [i for i, a in enumerate(axes) if a not in spec.optional_axes or len({k[i] for k in keys}) > 1]
    axes = tuple(axes[i] for i in kept)
    keys = list(dict.fromkeys(tuple(k[i] for i in kept) for k in keys))
    cell_of = {id(r): tuple(value(r, a) for a in axes) for r in rows}
    found: dict[tuple, list] = {}
    for row in admitted:
        found.setdefault(cell_of[id(row)], []).append(row)
    orders = {axis: [] if axis in NUMERIC else [v for e in experiments for v in e.values(axis)] for axis in axes}
    orders["model"] = models
    if "method" in orders:
        orders["method"] = ["dense"] + [m for m in orders["method"] if m != "dense"]
    keys.sort(key=lambda key: [_rank(v, orders[axis]) for axis, v in zip(axes, key)])

    def label(key):
        return " | ".join(axis_label(a, v) for a, v in zip(axes, key))

    by_seed = any("seed" in e.swept for e in experiments)
    chosen, listed, notes = {}, [], []
    for key in keys:
        seeds: dict = {}
        for row in found.get(key, []):
            seeds.setdefault(row["seed"], []).append(row)
        chosen[key] = [_chosen(candidates) for _, candidates in sorted(seeds.items())]
        for row in found.get(key, []):
            status = "used" if any(row is c for c in chosen[key]) else "not shown: another record of this cell is newer"
            listed.append(dict(row, cell=label(key), status=status))
        if any(len(c) > 1 for c in seeds.values()):
            notes.append(f"{label(key)}: {sum(map(len, seeds.values()))} records with other settings (batch size, "
                         f"tasks, ...); the newest shown.")
    for row in rows:
        if row["reason"] is not None:
            listed.append(dict(row, cell=label(cell_of[id(row)]), status=f"left out: {row['reason']}"))

    columns = columns_of(spec, split, rows)
    values, spread, shown, documents = ({c.header: [] for c in columns} for _ in range(4))
    for key in keys:
        used = chosen[key]
        for column in columns:
            number, error, count, docs = None, None, None, None
            if column.from_key:
                number = column.get(dict(zip(axes, key)))
            elif used and by_seed:
                per_seed = [column.get(r) for r in used]
                if None not in per_seed:
                    (number, error), count = stats.over_seeds(per_seed), len(per_seed)
                    docs = stats.seed_mean([column.documents(r) for r in used])
            elif used:
                number, error, docs = column.get(used[0]), column.stderr(used[0]), column.documents(used[0])
            values[column.header].append(number)
            spread[column.header].append(error if number is not None else None)
            shown[column.header].append(fmt(number, column.fmt, error, count))
            documents[column.header].append(docs)
    values, spread = pd.DataFrame(values, dtype=object), pd.DataFrame(spread, dtype=object)
    shown = pd.DataFrame(shown)

    marks = pd.DataFrame("", index=shown.index, columns=shown.columns)
    blocks: dict[tuple, list[int]] = {}
    for i, key in enumerate(keys):
        blocks.setdefault(key[:spec.block], []).append(i)
    untested = 0
    for column in columns:
        if column.better is None:
            continue
        for members in blocks.values():
            entries = [i for i in members if values[column.header][i] is not None and chosen[keys[i]]
                       and column.can_be_best(chosen[keys[i]][0])]
            marked, tested = mark_block(column, entries, values[column.header], shown[column.header],
                                        documents[column.header], spec.kind == "lm_eval")
            untested += not tested
            for i, mark in marked.items():
                marks.loc[i, column.header] = mark

    labels = pd.DataFrame([[axis_label(a, v) for a, v in zip(axes, key)] for key in keys],
                          columns=[header(a) for a in axes])
    repeats = [labels.iloc[:, : i + 1].eq(labels.iloc[:, : i + 1].shift()).all(axis=1).to_numpy()
               for i in range(min(spec.block, len(axes) - 1))]
    for i, repeat in enumerate(repeats):  # a block's axes are printed on the first row of their group only
        labels.iloc[repeat, i] = ""
    record_list = pd.DataFrame([{c: value(r, c) for c in RECORD_COLUMNS} for r in listed], columns=RECORD_COLUMNS)
    record_list["limit"] = record_list["limit"].astype("Int64")
    name = table_name(spec, split)
    legend = table_legend(spec, columns, by_seed, untested)
    notes = provenance(name, record_list, context) + unrepresentative(chosen, label) + notes
    return Table(name=name, title=table_title(spec, experiments, axes, split),
                 frame=pd.concat([labels, shown], axis=1),
                 marks=pd.concat([pd.DataFrame("", index=labels.index, columns=labels.columns), marks], axis=1),
                 values=values, spread=spread, n_expected=len(keys), n_missing=sum(not chosen[k] for k in keys),
                 axes=axes, notes=notes, legend=legend, records=record_list, keys=keys,
                 formats={c.header: c.fmt for c in columns},
                 used=[[r["run_id"] for r in chosen[k]] for k in keys])


def mark_block(column: Column, entries: list[int], values, shown, documents, tests: bool) -> tuple[dict, bool]:
    """Marks of one column in one block: {row: BEST or TIED}, and whether a paired test could decide them.
    Accuracy tables (`tests`): the best is BEST if it beats the runner-up significantly, else it and every
    entry not significantly worse than it are TIED; nothing is marked where the records have no per-document
    values. Other tables: the best as printed is BEST (several if they print alike), unless all print alike."""
    if len(entries) < 2:
        return {}, True
    ranked = sorted(entries, key=lambda i: values[i], reverse=column.better == "higher")
    if not tests:
        leaders = [i for i in ranked if shown[i] == shown[ranked[0]]]
        return ({} if len(leaders) == len(ranked) else {i: BEST for i in leaders}), True
    best, runner_up = ranked[0], ranked[1]
    if column.statistic is None:
        return {}, True  # a column no test can decide (its footnote says so)
    if documents[best] is None or documents[runner_up] is None:
        return {}, False
    p = stats.paired_pvalue(documents[best], documents[runner_up], column.statistic)
    if p is None:
        return {}, False
    if p < stats.ALPHA:
        return {best: BEST}, True
    tied = [best] + [i for i in ranked[1:] if documents[i] is not None
                     and (stats.paired_pvalue(documents[best], documents[i], column.statistic) or 0) >= stats.ALPHA]
    return {i: TIED for i in tied}, True


def table_legend(spec: Spec, columns: list[Column], by_seed: bool, untested: int) -> list[str]:
    lines = []
    if spec.kind == "lm_eval":
        lines.append("Cells: mean ± standard deviation over the sweep's seeds (n: seeds found)." if by_seed else
                     "Cells: mean ± standard error (lm-eval's; Avg: sqrt(sum of the squared task errors) / tasks).")
        lines.append(f"Bold: the best of its block, better than the runner-up under a {stats.TEST}; italic "
                     "(LaTeX: underlined): where it is not, the best and every run not significantly worse than it.")
        if untested:
            lines.append(f"{untested} column block(s) not tested (records without per-document samples, such as "
                         "results version 1's): nothing marked there.")
    lines += list(dict.fromkeys(c.meaning for c in columns if c.meaning))
    return lines + list(spec.notes)


def unrepresentative(chosen: dict, label) -> list[str]:
    """The footer's line on cells whose record says its forwards took a path nobody would time on that device (a
    pure-torch scan, reduction or decoding step on a GPU: records.PATH_KEYS): their latencies are not the kernels'."""
    cells = [label(key) for key, used in chosen.items()
             if any(records.unrepresentative_paths(r.get("efficiency") or r.get("generation") or {}) for r in used)]
    if not cells:
        return []
    return [f"Not representative: {len(cells)} cell(s) ran a pure-torch scan or reduction on the GPU "
            f"(efficiency.scan_kernel, reduction_kernels): " + "; ".join(cells) + "."]


def provenance(name: str, listed: pd.DataFrame, context: dict) -> list[str]:
    """The footer's lines on the records: how many were used and from which commits, which were left out and why."""
    used = listed[listed.status == "used"]
    commits = ", ".join(f"{c} ×{n}" for c, n in Counter(used.commit).most_common())
    versions = ", ".join(str(v) for v in sorted(set(used.results_version)))
    lines = [f"Records: {len(used)} used" + (f" (results version {versions}; commits {commits})" if len(used) else "")
             + f"; each cell's in {name}.records.csv."]
    reasons = Counter(s.removeprefix("left out: ") for s in listed.status if s.startswith("left out"))
    if reasons:
        lines.append(f"Left out: {sum(reasons.values())} record(s) of this table's runs: "
                     + "; ".join(f"{n} {reason}" for reason, n in reasons.most_common()) + ".")
    if context["results_version"] != RESULTS_VERSION:
        lines.append(f"Results version taken: {context['results_version']} (current: {RESULTS_VERSION}).")
    if context["include_limited"]:
        lines.append("Limited runs (benchmark.limit) included.")
    return lines


def table_name(spec: Spec, split: dict) -> str:
    parts = [spec.name]
    for name, found in split.items():
        if name == "mamba_version":
            parts.append({1: "mamba", 2: "mamba2"}.get(found, "other"))
        elif found is not None and found != spec.name and not (name == "protocol" and found == "exact"):
            parts.append("".join(c if c.isalnum() or c in "._-" else "-" for c in str(found)))
    return "_".join(parts)


def table_title(spec: Spec, experiments: list[Experiment], axes: tuple, split: dict) -> str:
    number = spec.numbers.get(split.get("mamba_version"), spec.numbers.get(None))
    details = [{1: "Mamba", 2: "Mamba-2"}.get(split["mamba_version"], "other")] if "mamba_version" in split else []
    fixed = experiments[0].fixed
    details += [f"{header(a)} {axis_label(a, v)}" for a, v in fixed.items()
                if (a in ("method", "ratio") or a.startswith("method.")) and a not in axes]
    details += [f"{name} {found}" for name, found in split.items() if name != "mamba_version" and found is not None]
    return (f"{number} — " if number else "") + spec.title + (f" ({', '.join(details)})" if details else "")


# ---------------------------------------------------------------------------------------------- output

SUFFIXES = (".md", ".tex", ".records.csv")


def write(tables: list[Table], out_dir) -> list[Path]:
    """<name>.md, <name>.tex and <name>.records.csv per table, and README.md listing them with how many runs each
    has. Tables the previous README listed that are not made now (a split that is gone) are removed, other files
    left alone."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    current = {f"{t.name}{suffix}" for t in tables for suffix in SUFFIXES}
    for name in previous_tables(out_dir) - current:
        (out_dir / name).unlink(missing_ok=True)
    paths = []
    for table in tables:
        for suffix, text in ((".md", table.markdown()), (".tex", table.latex()),
                             (".records.csv", table.records.to_csv(index=False))):
            path = out_dir / f"{table.name}{suffix}"
            path.write_text(text)
            paths.append(path)
    index = "\n".join(f"- [{t.title}]({t.name}.md) ([LaTeX]({t.name}.tex), [records]({t.name}.records.csv)): "
                      f"{t.n_expected - t.n_missing} of {t.n_expected} runs" for t in tables)
    (out_dir / "README.md").write_text("# Tables\n\nWritten by `make tables` (`python -m ssmcompress.tables`) from "
                                       f"the results store; {MISSING} marks a run not in the store.\n\n{index}\n")
    return paths


def previous_tables(out_dir: Path) -> set[str]:
    """The table files an earlier `write` listed in <out_dir>/README.md."""
    index = out_dir / "README.md"
    if not index.is_file():
        return set()
    return {name for name in re.findall(r"\]\(([^()/]+\.(?:md|tex|csv))\)", index.read_text())
            if name != "README.md"}


def results_version_arg(text: str) -> int | str:
    if text == "any":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"a results version is a positive integer or 'any', got {text!r}")
    return int(text)


def main(argv=None) -> list[Table]:
    parser = argparse.ArgumentParser(prog="python -m ssmcompress.tables", description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default="results", help="results store directory (records.jsonl; default: the "
                        "committed store results/ of the checkout you run from)")
    parser.add_argument("--out", default=None, help="where the tables go (default: <results>/tables)")
    parser.add_argument("--wandb", default=None, metavar="ENTITY/PROJECT",
                        help="also read the runs of this W&B project (public API; needs network and a login)")
    parser.add_argument("--include-limited", action="store_true",
                        help="let runs on a subset of the documents (benchmark.limit) fill cells")
    parser.add_argument("--results-version", type=results_version_arg, default=RESULTS_VERSION, metavar="N|any",
                        help=f"the results version cells take (default: the code's, {RESULTS_VERSION}); 'any': all")
    args = parser.parse_args(argv)
    found = load_records(args.results, args.wandb)
    df = frame(found)
    tables = build(df, include_limited=args.include_limited, results_version=args.results_version)
    out = Path(args.out or Path(args.results) / "tables")
    write(tables, out)
    print(f"{len(found)} records from {args.results}" + (f" and W&B {args.wandb}" if args.wandb else "")
          + f" ({df.attrs['duplicates']} superseded by a later run of the same config)")
    for table in tables:
        left = sum(table.records.status.str.startswith("left out"))
        print(f"  {table.name}: {table.n_expected - table.n_missing} of {table.n_expected} runs"
              + (f", {left} record(s) left out" if left else ""))
    print(f"wrote {len(SUFFIXES) * len(tables) + 1} files to {out}")
    return tables


def cli() -> None:
    """The console script `ssmcompress-tables` (= make tables)."""
    main()
