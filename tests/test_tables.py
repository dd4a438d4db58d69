"""Paper tables from the results store: layout, mean ± standard error, paired-test marks (bold vs tied), records left
out (limited, other seed, older results version) and listed, seeds averaged, shared cells across tables, hub
benchmarks, efficiency / generation / memory / pruning tables, W&B records, Markdown and LaTeX output; the CLI on a
real tiny sweep."""
import functools
import json
import math
import uuid
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from lm_eval.api import metrics as lm_metrics

from ssmcompress import records, tables, tracking
from ssmcompress.config import CONF_DIR, RESULTS_VERSION, register_resolvers, run_key, to_dict
from ssmcompress.evaluation import harness
from ssmcompress.tables import stats
from sweep_fixture import tiny_sweep

sweep = pytest.fixture(scope="session")(tiny_sweep)
DOCS = 40  # documents per task of the records built here
COMMIT = dict(commit="0123456789abcdef0123456789abcdef01234567", dirty=False, version="0.1.0")


@functools.lru_cache(maxsize=None)
def composed(overrides: tuple) -> str:
    register_resolvers()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        return json.dumps(to_dict(compose("config", overrides=["logger=none", *overrides])))


def documents(score: float, docs=None) -> list[float]:
    """Per-document accuracies: `docs` (0/1 per document) or the first round(score x DOCS) documents right."""
    return [float(v) for v in docs] if docs is not None else [1.0] * round(score * DOCS) + \
        [0.0] * (DOCS - round(score * DOCS))


def evaluation(bench: dict, score: float, docs=None) -> tuple[dict, dict, dict]:
    """metrics, stderr and samples as evaluation.harness.evaluate returns them, for every task right on the
    documents `documents(score, docs)` (accuracies) and perplexity 10 / score (per document, or per word / byte)."""
    metrics, stderr, samples = {}, {}, {}
    right = np.array(documents(score, docs))
    for task in bench["tasks"]:
        wanted = [bench["main_metric"][task]] if task in bench["main_metric"] else []
        wanted += bench.get("extra_metrics", {}).get(task, [])
        metrics[task], stderr[task], samples[task] = {}, {}, {"doc_id": list(range(len(right)))}
        for metric in wanted:
            if metric == "token_perplexity":  # derived by the harness: no per-document values
                values = None
                metrics[task][metric], stderr[task][metric] = 5 / score, 0.5
                continue
            if metric in ("acc", "acc_norm", "exact_match"):
                values = right.tolist()
            elif metric == "perplexity":
                values = [-math.log(10 / score)] * len(right)
            elif metric == "bits_per_byte":
                values = [[-score * math.log(2) * 10, 10]] * len(right)
            else:  # word_perplexity, byte_perplexity: (log-likelihood, words) pairs
                values = [[-math.log(10 / score) * 10, 10]] * len(right)
            samples[task][metric] = values
            metrics[task][metric] = float(stats.AGGREGATES[metric](np.array(values)))
            stderr[task][metric] = float(np.std(right, ddof=1) / math.sqrt(len(right))) if metric.startswith(
                ("acc", "exact")) else 1.0
    return metrics, stderr, samples


def record(model="mamba2-tiny", method="dense", ratio=None, *extra, score=0.5, benchmark="offline_full",
           time="2026-01-01", pruner=None, sparsity=None, seed=0, limit=None, version=RESULTS_VERSION, docs=None,
           samples=True, env=None, **sections):
    """A valid records.Record of a composed config, as the runner writes it (scores: see `evaluation`)."""
    overrides = (f"model={model}", f"method={method}", f"benchmark={benchmark}", f"seed={seed}", *extra,
                 *((f"ratio={ratio}",) if ratio is not None else ()),
                 *((f"pruner={pruner}", f"sparsity={sparsity}") if pruner else ()),
                 *((f"benchmark.limit={limit}",) if limit is not None else ()))
    config = json.loads(composed(overrides))
    bench = config["benchmark"]
    measured = dict(metrics=None, stderr=None, samples=None, headline=None)
    if bench["kind"] == "lm_eval":
        metrics, stderr, per_document = evaluation(bench, score, docs)
        measured = dict(metrics=metrics, stderr=stderr if samples else None, samples=per_document if samples else None,
                        headline=harness.headline(metrics, bench))
    generation = {"Mamba1": 1, "Mamba2": 2, "Mamba3": 3}[config["model"]["config"]["ssm_cfg"]["layer"]]
    return records.Record(
        run_id=uuid.uuid4().hex[:12], key=run_key(config, results_version=version), time=time, config=config,
        model=model, method=method, benchmark=bench["name"], protocol=config["protocol"], seed=seed,
        pruner=pruner or "none", timings={}, results_version=version, git=COMMIT, env=env or dict(cpu="x86_64"),
        ratio=None if method == "dense" else ratio, layers=None if method == "dense" else config["layers"],
        sparsity=sparsity, model_info=dict(mamba_version=generation), **measured, **sections).to_dict()


def by_name(found, **options):
    return {table.name: table for table in tables.build(tables.frame(found), **options)}


def rows(table):
    """{(block labels..., row label): {column: shown value}}, block labels carried down."""
    frame = table.frame.replace("", None).ffill()
    n = len(table.axes)
    return {tuple(r[:n]): dict(zip(frame.columns[n:], r[n:])) for r in frame.itertuples(index=False)}


def mark(table, key, column):
    frame = table.frame.replace("", None).ffill()
    n = len(table.axes)
    index = next(i for i, r in enumerate(frame.itertuples(index=False)) if tuple(r[:n]) == key)
    return table.marks.iloc[index][column]


def bold(table, key, column):
    return mark(table, key, column) == tables.BEST


def test_helper_records_are_valid_records_the_store_reads(tmp_path):
    for found in (record(), record("mamba2-tiny", "ours", 0.2, score=0.55), efficiency("ours", 0.2)):
        tracking.append(found, tmp_path)
    assert [r["key"] for r in tracking.load(tmp_path)] == [r["key"] for r in map(json.loads, (
        tmp_path / tracking.STORE).read_text().splitlines())]


def test_main_table_layout_stderr_and_missing_runs():
    found = [record(score=0.6), record("mamba2-tiny", "ours", 0.1, score=0.55),
             record("mamba2-tiny", "evit", 0.1, score=0.3), record("mamba2-tiny", "ours", 0.2, score=0.5),
             record("mamba2-tiny", "ours", 0.2, "method.importance=l1", score=0.1),  # ablation, not Table 1
             record("mamba2-tiny", "dense", None, score=0.9, pruner="magnitude", sparsity=0.5)]
    built = by_name(found)
    table = built["main_offline_full_mamba2"]
    assert table.title.startswith("Table 1 — Main accuracy (Mamba-2")
    assert list(table.frame.columns) == ["model", "FLOPs↓", "method", "Lastword PPL/word", "Lastword PPL/token",
                                         "Lastword", "Continuation", "MQAR", "StoryQA", "Avg"]
    cells = rows(table)
    se = np.std(documents(0.55), ddof=1) / math.sqrt(DOCS)  # lm-eval's standard error of a mean
    assert cells[("mamba2-tiny", "10 %", "UTR (ours)")] == {
        "Lastword PPL/word": "18.18 ± 1.00", "Lastword PPL/token": "9.091 ± 0.500", "Lastword": f"55.0 ± {100 * se:.1f}",
        "Continuation": f"55.0 ± {100 * se:.1f}", "MQAR": f"55.0 ± {100 * se:.1f}",
        "StoryQA": f"55.0 ± {100 * se:.1f}", "Avg": f"55.0 ± {100 * se / 2:.1f}"}  # sqrt(4 se²) / 4
    row = list(cells).index(("mamba2-tiny", "10 %", "UTR (ours)"))
    assert table.spread.loc[row, "Avg"] == pytest.approx(math.sqrt(4 * se ** 2) / 4)
    assert cells[("mamba2-tiny", "0 %", "dense")]["Avg"].startswith("60.0 ± ")
    assert set(cells[("mamba2-tiny", "10 %", "PuMer")].values()) == {tables.MISSING}  # shown, not dropped
    assert (table.n_expected, table.n_missing) == (1 + 6 * 3, 1 + 6 * 3 - 4)
    assert "Missing: 15 of 19 runs" in table.markdown()
    footer = table.footer()
    assert "mean ± standard error" in footer and "paired bootstrap" in footer
    assert "PPL/word: lm-eval's LAMBADA perplexity" in footer and "PPL/token:" in footer  # what 1e6 means
    assert "Records: 4 used (results version 2; commits 0123456 ×4)" in footer
    assert built["main_offline_full_mamba"].n_missing == built["main_offline_full_mamba"].n_expected == 19

    # one run fills its cell in every table it belongs to; the ablated run only its own
    assert rows(built["importance_offline_full"])[("mamba2-tiny", "20 %", "Clip (ours)")]["Avg"].startswith("50.0")
    assert rows(built["importance_offline_full"])[("mamba2-tiny", "20 %", "ℓ1-norm")]["Avg"].startswith("10.0")
    assert rows(built["location_offline_full"])[("mamba2-tiny", "20 %", "default")]["Avg"].startswith("50.0")
    assert rows(built["share_offline_full"])[("mamba2-tiny", "20 %", "0.5")]["Avg"].startswith("50.0")
    assert rows(built["design_offline_full"])[("mamba2-tiny", "30 %", "q = 0.5 / M-only")]["Avg"] == tables.MISSING


def test_best_is_bold_only_when_a_paired_test_says_it_beats_the_runner_up():
    rng = np.random.default_rng(1)
    base = (rng.random(DOCS) < 0.5).astype(int)
    near = base.copy()
    near[np.flatnonzero(base == 0)[:2]] = 1  # per task two documents more and one less: not significant,
    near[np.flatnonzero(base == 1)[0]] = 0  # not even over the four tasks of Avg (8 more, 4 less)
    found = [record("mamba2-tiny", "ours", 0.1, score=0.95), record("mamba2-tiny", "evit", 0.1, score=0.3),
             record("mamba2-tiny", "ours", 0.2, docs=near), record("mamba2-tiny", "evit", 0.2, docs=base),
             record("mamba2-tiny", "tome", 0.2, score=0.05)]
    table = by_name(found)["main_offline_full_mamba2"]
    for column in ("MQAR", "Avg", "Lastword PPL/word"):  # accuracy (higher) and perplexity (lower) alike
        assert bold(table, ("mamba2-tiny", "10 %", "UTR (ours)"), column)
        assert mark(table, ("mamba2-tiny", "10 %", "EViT"), column) == ""
    for column in ("MQAR", "Avg"):  # the best does not beat the runner-up: both marked alike, not bold
        assert mark(table, ("mamba2-tiny", "20 %", "UTR (ours)"), column) == tables.TIED
        assert mark(table, ("mamba2-tiny", "20 %", "EViT"), column) == tables.TIED
        assert mark(table, ("mamba2-tiny", "20 %", "ToMe"), column) == ""  # significantly worse
    assert mark(table, ("mamba2-tiny", "10 %", "UTR (ours)"), "Lastword PPL/token") == ""  # no documents: no test
    markdown = table.markdown()
    assert "| **95.0 ± " in markdown and "| *" in markdown and "two-sided p < 0.05" in markdown
    latex = table.latex()
    assert "\\textbf{95.0 $\\pm$" in latex and "\\underline{" in latex


def test_paired_bootstrap_and_aggregates():
    ids = np.arange(200)
    rng = np.random.default_rng(0)
    a = (rng.random(200) < 0.7).astype(float)
    b = (rng.random(200) < 0.3).astype(float)
    mean = stats.AGGREGATES["acc"]
    one = lambda values: mean(values[0])  # noqa: E731
    assert stats.paired_pvalue([(ids, a)], [(ids, b)], one) < 0.001
    assert stats.paired_pvalue([(ids, a)], [(ids, a)], one) == 1.0
    assert stats.paired_pvalue([(ids, a)], [(ids + 1, b)], one) is None  # other documents: no paired test
    assert stats.paired_pvalue([(ids, a)], [(ids, b)], one) == stats.paired_pvalue([(ids, a)], [(ids, b)], one)
    # the aggregates are lm-eval's
    logliks = rng.normal(-3, 1, 50)
    pairs = np.stack([rng.normal(-30, 5, 50), rng.integers(5, 15, 50)], axis=1)
    assert stats.perplexity(logliks) == pytest.approx(lm_metrics.perplexity(list(logliks)))
    assert stats.weighted_perplexity(pairs) == pytest.approx(lm_metrics.weighted_perplexity(list(map(tuple, pairs))))
    assert stats.bits_per_byte(pairs) == pytest.approx(lm_metrics.bits_per_byte(list(map(tuple, pairs))))
    assert stats.average_stderr([0.03, 0.04]) == pytest.approx(0.025) and stats.average_stderr([0.1, None]) is None


def test_records_without_samples_are_not_tested_and_say_so():
    found = [record("mamba2-tiny", "ours", 0.1, score=0.95, samples=False, version=1),
             record("mamba2-tiny", "evit", 0.1, score=0.3, samples=False, version=1)]
    assert "main_offline_full_mamba2" not in by_name(found) or \
        by_name(found)["main_offline_full_mamba2"].n_missing == 19  # version 1 stays out by default
    table = by_name(found, results_version="any")["main_offline_full_mamba2"]
    assert rows(table)[("mamba2-tiny", "10 %", "UTR (ours)")]["Avg"] == "95.0"  # no standard error recorded
    assert not (table.marks != "").any().any()
    assert "not tested (records without per-document samples" in table.footer()
    assert "Results version taken: any" in table.footer()


def test_limited_other_seed_and_older_version_records_are_left_out_and_listed():
    found = [record("mamba2-tiny", "ours", 0.1, score=0.5),
             record("mamba2-tiny", "ours", 0.1, score=0.9, seed=1, time="2026-01-02"),
             record("mamba2-tiny", "ours", 0.1, score=0.8, version=1, time="2026-01-03"),
             record("mamba2-tiny", "evit", 0.1, score=0.7, limit=20)]
    table = by_name(found)["main_offline_full_mamba2"]
    cells = rows(table)
    assert cells[("mamba2-tiny", "10 %", "UTR (ours)")]["Avg"].startswith("50.0 ± ")
    assert cells[("mamba2-tiny", "10 %", "EViT")]["Avg"] == tables.MISSING
    footer = table.footer()
    assert "Records: 1 used" in footer and "Left out: 3 record(s)" in footer
    assert "1 limited to 20 documents per task" in footer and "1 seed 1, not the sweep's (0)" in footer
    assert "1 results version 1, not 2" in footer
    listed = table.records.set_index("run_id")
    assert list(table.records.columns) == ["cell", "status", "run_id", "key", "time", "commit", "seed",
                                           "results_version", "limit"]
    assert listed.loc[found[0]["run_id"], "status"] == "used"
    assert listed.loc[found[1]["run_id"], "status"].startswith("left out: seed 1")
    assert listed.loc[found[2]["run_id"], "status"].startswith("left out: results version 1")
    assert listed.loc[found[3]["run_id"], "cell"] == "mamba2-tiny | 10 % | EViT"
    # asked for: the limited run fills its cell; any version: the newer version still wins its cell
    assert rows(by_name(found, include_limited=True)["main_offline_full_mamba2"])[
        ("mamba2-tiny", "10 %", "EViT")]["Avg"].startswith("70.0 ± ")
    anyversion = by_name(found, results_version="any")["main_offline_full_mamba2"]
    assert rows(anyversion)[("mamba2-tiny", "10 %", "UTR (ours)")]["Avg"].startswith("50.0 ± ")
    assert "not shown: another record of this cell is newer" in set(anyversion.records.status)
    assert rows(by_name(found, results_version=1)["main_offline_full_mamba2"])[
        ("mamba2-tiny", "10 %", "UTR (ours)")]["Avg"].startswith("80.0 ± ")


def test_a_record_of_another_bundled_model_than_this_packages_is_left_out():
    current = record("mamba2-tiny", "ours", 0.1, score=0.5)
    retrained = dict(record("mamba2-tiny", "ours", 0.2, score=0.9), key="0123456789abcdef")  # keyed elsewhere
    table = by_name([current, retrained])["main_offline_full_mamba2"]
    assert rows(table)[("mamba2-tiny", "20 %", "UTR (ours)")]["Avg"] == tables.MISSING
    status = table.records.set_index("run_id").loc[retrained["run_id"], "status"]
    assert status.startswith("left out: run on other contents of a bundled model or task")


def test_a_sweep_over_seeds_averages_them(tmp_path):
    (tmp_path / "seeds.yaml").write_text("defaults:\n  - override /benchmark: offline_full\nhydra:\n  sweeper:\n"
                                         "    params:\n      method: dense,ours\n      ratio: 0.2\n      seed: 0,1,2\n")
    spec = tables.Spec("seeds", "Seeds", ("seeds",))
    found = [record("mamba2-tiny", "ours", 0.2, score=s, seed=seed) for s, seed in ((0.5, 0), (0.6, 1), (0.7, 2))]
    found += [record(score=0.8), record("mamba2-tiny", "ours", 0.2, score=0.1, seed=3)]
    (table,) = tables.build(tables.frame(found), [spec], directory=tmp_path)
    cells = rows(table)
    assert cells[("mamba2-tiny", "20 %", "UTR (ours)")]["Avg"] == "60.0 ± 10.0 (n=3)"  # mean ± std over seeds
    assert cells[("mamba2-tiny", "0 %", "dense")]["Avg"] == "80.0 (n=1)"
    assert "standard deviation over the sweep's seeds" in table.footer()
    assert "1 seed 3, not the sweep's (0, 1, 2)" in table.footer()
    assert sorted(table.records[table.records.status == "used"].seed) == [0, 0, 1, 2]


def test_schedule_and_positional_tables():
    found = [record("mamba2-tiny", "ours", 0.2, score=0.5), record("mamba2-tiny", "ours", 0.2, "schedule=chunk",
                                                                   score=0.4),
             record("mamba2-tiny", "early", 0.2, score=0.3)]
    built = by_name(found)
    schedule = rows(built["schedule_offline_full"])
    assert schedule[("mamba2-tiny", "20 %", "UTR (ours)", "smooth")]["Avg"].startswith("50.0")
    assert schedule[("mamba2-tiny", "20 %", "UTR (ours)", "chunk")]["Avg"].startswith("40.0")
    assert set(schedule[("mamba2-tiny", "10 %", "EViT", "chunk")].values()) == {tables.MISSING}  # the sweep's grid
    main = rows(built["main_offline_full_mamba2"])  # a chunk run is not the main table's
    assert main[("mamba2-tiny", "20 %", "UTR (ours)")]["Avg"].startswith("50.0")
    assert "records with other settings" not in built["main_offline_full_mamba2"].footer()
    assert ("mamba2-tiny", "20 %", "early") not in main  # a positional baseline is the positional table's
    positional = rows(built["positional_offline_full_mamba2"])
    assert positional[("mamba2-tiny", "20 %", "early")]["Avg"].startswith("30.0")
    assert built["positional_offline_full_mamba2"].n_expected == 1 + 11 * 3  # dense, eleven methods


def test_mamba3_table_with_its_trapezoid_and_rotation_ablations_and_no_other_tables_rows():
    found = [record("mamba3-tiny", "dense", score=0.6), record("mamba3-tiny", "ours", 0.3, score=0.5),
             record("mamba3-tiny", "ours", 0.3, "trapezoid=none", score=0.4),
             record("mamba3-tiny", "ours", 0.3, "rotation=positions", score=0.45),
             record("mamba3-tiny", "early", 0.3, score=0.3)]
    built = by_name(found)
    table = rows(built["mamba3_offline_full"])
    assert table[("mamba3-tiny", "kept", "kept", "0 %", "dense")]["Avg"].startswith("60.0")
    assert table[("mamba3-tiny", "kept", "kept", "30 %", "UTR (ours)")]["Avg"].startswith("50.0")
    assert table[("mamba3-tiny", "none", "kept", "30 %", "UTR (ours)")]["Avg"].startswith("40.0")
    assert table[("mamba3-tiny", "kept", "positions", "30 %", "UTR (ours)")]["Avg"].startswith("45.0")
    assert table[("mamba3-tiny", "kept", "sizes", "30 %", "UTR (ours)")]["Avg"] == tables.MISSING
    assert table[("mamba3-tiny", "kept", "kept", "30 %", "early")]["Avg"].startswith("30.0")
    # dense, nine methods with both defaults, the data-driven five and the official path's with trapezoid=none and
    # with each of the two other rotations
    assert built["mamba3_offline_full"].n_expected == 1 + 9 * 3 + 5 * 3 + 2 * 5 * 3
    assert ("mamba3-tiny", "none", "kept", "30 %", "early") not in table
    assert ("mamba3-tiny", "none", "positions", "30 %", "UTR (ours)") not in table
    # the Mamba-1/2 tables (Tables 1 and 2, the positional baselines) take no Mamba-3 record
    others = [name for name in built if name.startswith(("main_", "positional_"))]
    assert others and not [name for name in others if not name.endswith(("_mamba", "_mamba2"))]
    assert not [key for name in others for key in rows(built[name]) if "mamba3-tiny" in key]


def test_ablation_rows_and_hub_benchmarks():
    found = [record("mamba2-tiny", "ours", 0.3, "method.hidden=merge", "method.residual=merge", score=0.2),
             record("mamba2-tiny", "ours", 0.3, "method.hidden=hybrid", "method.residual=hybrid",
                    "method.hidden_q=0.8", "method.residual_q=0.2", score=0.3),
             record("mamba2-tiny", "ours", 0.3, "method.q=0.9", score=0.4),  # in no design row: added as is
             record("mamba2-tiny", "ours", 0.2, "layers=[1,2,3,4,5,6,7]", score=0.45),
             record("mamba2-tiny", "ours", 0.1, score=0.5),  # Table 1's default run at a budget no ablation sweeps
             record("mamba2-2.7b", "dense", None, benchmark="paper6", score=0.65),
             record("mamba2-2.7b", "ours", 0.2, benchmark="paper6", score=0.6)]
    built = by_name(found)
    design = rows(built["design_offline_full"])
    assert design[("mamba2-tiny", "30 %", "M-only / M-only")]["Avg"].startswith("20.0")
    assert design[("mamba2-tiny", "30 %", "q = 0.8 / q = 0.2")]["Avg"].startswith("30.0")
    assert design[("mamba2-tiny", "30 %", "P-only / P-only")]["Avg"] == tables.MISSING
    assert rows(built["share_offline_full"])[("mamba2-tiny", "30 %", "0.9")]["Avg"].startswith("40.0")
    assert not [key for key in rows(built["share_offline_full"]) if key[1] == "10 %"]
    assert rows(built["location_offline_full"])[("mamba2-tiny", "20 %", "[1,2,3,4,5,6,7]")]["Avg"].startswith("45.0")

    hub = built["main_paper6_mamba2"]  # a hub model's runs make their own table, the benchmark's columns
    assert list(hub.frame.columns)[3:] == ["LAMBADA PPL/word", "LAMBADA", "HellaSwag", "PIQA", "ARC-E", "ARC-C",
                                           "WinoGrande", "Avg"]
    assert rows(hub)[("mamba2-2.7b", "20 %", "UTR (ours)")]["Avg"].startswith("60.0")
    assert (hub.n_expected, hub.n_missing) == (19, 17)
    location = rows(built["location_paper6"])  # the paper's Table 4 rows, from ablation_location_hub.yaml
    assert location[("mamba2-2.7b", "20 %", "default")]["Avg"].startswith("60.0")
    assert ("mamba2-2.7b", "20 %", "[20,25,30,35,40,45,50]") in location
    assert "importance_paper6" not in built  # no ablated run of that model: no table of missing rows


def test_no_table_from_left_out_or_pruning_benchmark_records():
    """A benchmark no sweep of the table runs gets a table only from admitted records, and the pruning sweeps'
    benchmark none of the reduction tables, though its dense and reduction-only runs have their settings."""
    found = [record("mamba2-tiny", "ours", 0.2, benchmark="offline", version=RESULTS_VERSION - 1, score=0.3),
             record("mamba2-tiny", "dense", benchmark="pruning", score=0.6),
             record("mamba2-tiny", "ours", 0.2, benchmark="pruning", score=0.4)]
    built = by_name(found)
    assert not {name for name in built if "_offline_" in name and "offline_full" not in name}
    assert not {name for name in built if name.startswith(("main_pruning", "positional_pruning"))}
    joint = rows(built["joint_pruning"])
    assert joint[("mamba2-tiny", "none", "0 %", "20 %", "UTR (ours)")]["Avg"].startswith("40.0")


def test_rerun_of_a_config_counts_once_and_the_latest_wins():
    first = record("mamba2-tiny", "ours", 0.1, score=0.2, time="2026-01-01T10:00:00")
    again = dict(record("mamba2-tiny", "ours", 0.1, score=0.3, time="2026-01-02T10:00:00"), run_id="b")
    df = tables.frame([again, first])
    assert len(df) == 1 and df.attrs["duplicates"] == 1
    cells = rows(by_name([first, again])["main_offline_full_mamba2"])
    assert cells[("mamba2-tiny", "10 %", "UTR (ours)")]["Avg"].startswith("30.0")


def test_other_settings_in_one_cell_and_partial_runs_are_flagged():
    found = [record("mamba2-tiny", "ours", 0.1, score=0.2, time="2026-01-01"),
             record("mamba2-tiny", "ours", 0.1, "benchmark.batch_size=8", score=0.3, time="2026-01-02"),
             record("mamba2-tiny", "evit", 0.1, "benchmark.tasks=[mqar]", score=0.4),
             record("mamba2-tiny", "ours", 0.4, score=0.1)]  # a budget outside the sweep: added, with its block
    table = by_name(found)["main_offline_full_mamba2"]
    cells = rows(table)
    assert cells[("mamba2-tiny", "10 %", "UTR (ours)")]["Avg"].startswith("30.0")
    assert any("2 records with other settings" in note for note in table.notes)
    assert cells[("mamba2-tiny", "10 %", "EViT")]["MQAR"].startswith("40.0")
    assert cells[("mamba2-tiny", "10 %", "EViT")]["Avg"] == tables.MISSING  # fewer tasks: no comparable average
    assert cells[("mamba2-tiny", "40 %", "UTR (ours)")]["Avg"].startswith("10.0")
    assert set(cells[("mamba2-tiny", "40 %", "EViT")].values()) == {tables.MISSING}


def efficiency(method, ratio=None, latency=10.0, schedule=None, model="mamba2-tiny", **extra):
    fields = {"device": "cpu", "batch_size": 1, "length": 64, "dense_latency_ms": 10.0, "dense_tokens_per_s": 6400.0,
              "dense_peak_mib": 100.0, "dense_activation_mib": 10.0}
    if method != "dense":
        fields.update(reduced_latency_ms=latency, reduced_tokens_per_s=64000 / latency, reduced_peak_mib=90.0,
                      reduced_activation_mib=8.0, speedup=10.0 / latency, peak_memory_saving=0.1,
                      reduction_overhead=0.01, ceiling_latency_ms=6.25, ceiling_speedup=1.6,
                      of_ceiling=10.0 / latency / 1.6)
    fields.update(extra)
    return record(model, method, ratio, f"benchmark.measure.shape.cpu.batch_size={fields['batch_size']}",
                  *((f"schedule={schedule}",) if schedule else ()), benchmark="efficiency", efficiency=fields,
                  flops=dict(achieved_ratio=ratio or 0.0))


def test_efficiency_table():
    built = by_name([efficiency("dense"), efficiency("ours", 0.2, latency=8.0), efficiency("evit", 0.2, latency=7.5),
                     record("mamba2-tiny", "ours", 0.2), efficiency("ours", 0.2, latency=5.0, batch_size=8),
                     efficiency("ours", 0.1, latency=11.0), efficiency("evit", 0.1, latency=12.0)])
    table = built["efficiency_x86_64_batch-1-x-64"]  # one table per device and input shape
    assert "schedule" not in table.axes  # every run smooth: no schedule column
    cells = rows(table)
    assert cells[("mamba2-tiny", "0 %", "dense")]["speed-up"] == "1.00"
    assert cells[("mamba2-tiny", "20 %", "UTR (ours)")] == {
        "FLOPs↓ achieved": "20.0 %", "latency ms": "8.00", "tokens/s": "8000.00", "peak MiB": "90.00",
        "activation MiB": "8.00", "speed-up": "1.25", "of ideal": "100.0 %", "of ceiling": "78.1 %",
        "overhead": "1.0 %", "peak memory saving": "10.0 %"}
    assert bold(table, ("mamba2-tiny", "20 %", "EViT"), "speed-up")
    assert bold(table, ("mamba2-tiny", "20 %", "EViT"), "latency ms")
    assert not bold(table, ("mamba2-tiny", "20 %", "UTR (ours)"), "speed-up")
    for column in ("speed-up", "latency ms", "tokens/s", "of ceiling"):  # both slower than dense: nothing is best
        assert not (bold(table, ("mamba2-tiny", "10 %", "UTR (ours)"), column)
                    or bold(table, ("mamba2-tiny", "10 %", "EViT"), column))
    # a device's table lists the sweep's models if it measured one of them (the GPU's: the hub models it measured)
    assert table.n_expected == 2 * 19 and "no test" in table.footer()
    assert rows(built["efficiency_x86_64_batch-8-x-64"])[("mamba2-tiny", "20 %", "UTR (ours)")]["speed-up"] == "2.00"

    chunked = by_name([efficiency("dense"), efficiency("ours", 0.2, latency=8.0),
                       efficiency("ours", 0.2, latency=6.0, schedule="chunk")])["efficiency_x86_64_batch-1-x-64"]
    assert chunked.axes == ("model", "ratio", "method", "schedule")  # the schedule where records differ
    cells = rows(chunked)
    assert cells[("mamba2-tiny", "20 %", "UTR (ours)", "chunk")]["speed-up"] == "1.67"
    assert cells[("mamba2-tiny", "20 %", "UTR (ours)", "smooth")]["speed-up"] == "1.25"
    assert cells[("mamba2-tiny", "20 %", "UTR (ours)", "smooth")]["of ceiling"] == "78.1 %"


def test_efficiency_table_flags_cells_timed_on_a_pure_torch_path():
    slow = "pure-torch reference: not representative"
    table = by_name([efficiency("dense"), efficiency("ours", 0.2, latency=8.0, reduction_kernels=slow),
                     efficiency("evit", 0.2, latency=7.5, reduction_kernels="fused Triton kernels")]
                    )["efficiency_x86_64_batch-1-x-64"]
    (line,) = [note for note in table.notes if note.startswith("Not representative")]
    assert line.endswith(": mamba2-tiny | 20 % | UTR (ours).") and "1 cell(s)" in line
    clean = by_name([efficiency("dense"), efficiency("evit", 0.2)])["efficiency_x86_64_batch-1-x-64"]
    assert not any(note.startswith("Not representative") for note in clean.notes)


def generation_record(model, method, ratio, speedup, prefill_speedup=1.2, **extra):
    fields = dict(device="cuda:0", device_name="NVIDIA H200", batch_size=16, length=2048, new_tokens=100,
                  dense_prefill_ms=580.0, dense_generation_ms=1200.0, dense_decode_ms_per_token=6.2,
                  dense_tokens_per_s=1333.3, dense_peak_mib=9300.0, reduced_prefill_ms=580.0 / prefill_speedup,
                  reduced_generation_ms=1200.0 / speedup, reduced_decode_ms_per_token=6.1,
                  reduced_tokens_per_s=1333.3 * speedup, reduced_peak_mib=9330.0, speedup=speedup,
                  prefill_speedup=prefill_speedup, bound=1.13, of_bound=speedup / 1.13, **extra)
    return record(model, method, ratio, "model.random_init=true", benchmark="generation", generation=fields,
                  flops=dict(achieved_ratio=ratio), env=dict(gpu="NVIDIA H200"))


def test_generation_table_with_the_papers_speedups():
    found = [generation_record("mamba2-2.7b", "ours", 0.3, 1.11), generation_record("mamba2-2.7b", "evit", 0.3, 1.13),
             generation_record("mamba2-1.3b", "ours", 0.1, 0.96, prefill_speedup=0.92)]
    (table,) = [t for name, t in by_name(found).items() if name.startswith("generation")]
    assert table.name == "generation_NVIDIA-H200_batch-16-x-2048---100-tokens"
    assert list(table.frame.columns)[3:] == [
        "FLOPs↓ achieved", "prefill ms", "generation ms", "decode ms/token", "tokens/s", "speed-up", "paper speed-up",
        "prefill speed-up", "bound", "of bound", "peak MiB", "KV cache MiB", "KV saved", "KV saved, expected"]
    cells = rows(table)
    assert cells[("mamba2-2.7b", "30 %", "UTR (ours)")]["speed-up"] == "1.11"
    assert cells[("mamba2-2.7b", "30 %", "UTR (ours)")]["paper speed-up"] == "1.37"
    assert cells[("mamba2-2.7b", "30 %", "EViT")]["paper speed-up"] == tables.MISSING  # the paper's are UTR's
    assert cells[("mamba2-2.7b", "20 %", "UTR (ours)")]["speed-up"] == tables.MISSING  # not run: still the paper's
    assert cells[("mamba2-2.7b", "20 %", "UTR (ours)")]["paper speed-up"] == "1.22"
    assert cells[("mamba2-1.3b", "10 %", "UTR (ours)")]["paper speed-up"] == "1.10"
    assert bold(table, ("mamba2-2.7b", "30 %", "EViT"), "speed-up")
    assert not bold(table, ("mamba2-1.3b", "10 %", "UTR (ours)"), "speed-up")  # alone, and below 1x
    # the sweep's grid: 2 models x 6 methods x 3 budgets
    assert (table.n_expected, table.n_missing) == (36, 33) and "EMNLP 2024" in table.footer()


def test_memory_table_with_the_papers_figures():
    big = functools.partial(efficiency, model="mamba2-2.7b", length=2048)
    built = by_name([big("ours", 0.3, batch_size=96, dense_peak_mib=25090.0, reduced_peak_mib=20860.0,
                         peak_memory_saving=1 - 20860.0 / 25090.0),
                     big("ours", 0.2, batch_size=8)])  # another shape: not the memory table's
    (name,) = [n for n in built if n.startswith("memory")]
    assert name == "memory_x86_64_batch-96-x-2048"
    assert not [n for n in built if n.startswith("efficiency") and "batch-96" in n]  # the memory table's shape
    cells = rows(built[name])
    assert cells[("mamba2-2.7b", "30 %", "UTR (ours)")]["peak change"] == "-16.9 %"
    assert cells[("mamba2-2.7b", "30 %", "UTR (ours)")]["paper peak change"] == "-30.6 %"
    assert cells[("mamba2-1.3b", "30 %", "UTR (ours)")]["paper peak change"] == "-42.9 %"
    assert cells[("mamba2-1.3b", "30 %", "UTR (ours)")]["peak MiB"] == tables.MISSING
    assert tables.PAPER["peak_memory_change"]["mamba2-2.7b"] == {0.1: -0.114, 0.2: -0.203, 0.3: -0.306}
    assert tables.PAPER["generation_speedup"]["mamba2-1.3b"] == {0.1: 1.10, 0.2: 1.19, 0.3: 1.35}


def test_pruning_and_joint_tables():
    dense = functools.partial(record, "mamba2-tiny", "dense", None, benchmark="pruning")
    ours = functools.partial(record, "mamba2-tiny", "ours", 0.2, benchmark="pruning")
    found = [dense(score=0.6), dense(score=0.5, pruner="magnitude", sparsity=0.5),
             dense(score=0.55, pruner="wanda", sparsity=0.5), dense(score=0.4, pruner="wanda", sparsity="2:4"),
             ours(score=0.45), ours(score=0.35, pruner="wanda", sparsity=0.5), record(score=0.7)]
    built = by_name(found)
    pruning, joint = built["pruning"], built["joint_pruning"]
    assert list(pruning.frame.columns) == [
        "model", "sparsity", "pruner", "Held-out word PPL", "Held-out bits/byte", "Lastword PPL/word",
        "Lastword PPL/token", "Lastword", "Continuation", "MQAR", "StoryQA", "Avg"]
    cells = rows(pruning)
    assert cells[("mamba2-tiny", "0 %", "none")]["Avg"].startswith("60.0")
    assert cells[("mamba2-tiny", "50 %", "wanda")]["Avg"].startswith("55.0")
    assert cells[("mamba2-tiny", "50 %", "wanda")]["Held-out word PPL"] == "18.18 ± 1.00"
    assert cells[("mamba2-tiny", "2:4", "magnitude")]["Avg"] == tables.MISSING
    assert bold(pruning, ("mamba2-tiny", "50 %", "wanda"), "Avg")  # 2 documents more on each of 4 tasks
    assert mark(pruning, ("mamba2-tiny", "50 %", "wanda"), "MQAR") == tables.TIED  # on one task: not significant
    cells = rows(joint)
    assert cells[("mamba2-tiny", "none", "0 %", "0 %", "dense")]["Avg"].startswith("60.0")
    assert cells[("mamba2-tiny", "wanda", "50 %", "20 %", "UTR (ours)")]["Avg"].startswith("35.0")
    assert cells[("mamba2-tiny", "wanda", "2:4", "20 %", "UTR (ours)")]["Avg"] == tables.MISSING
    main = rows(built["main_offline_full_mamba2"])
    assert main[("mamba2-tiny", "0 %", "dense")]["Avg"].startswith("70.0")  # pruned runs stay out of Table 1


def test_records_from_wandb_match_the_local_store():
    local = record("mamba2-tiny", "ours", 0.1, score=0.55, flops={"achieved_ratio": 0.1})
    summary = {"key": local["key"]}  # as tracking.WandbLogger.log writes it
    for section in ("metrics", "headline", "flops"):
        summary.update(tracking._flatten(local[section], section))
    config = dict(local["config"], run=dict(key=local["key"], run_id=local["run_id"], git=local["git"]))
    wrapped = {k: {"value": v, "desc": None} for k, v in config.items()}
    runs = [SimpleNamespace(id="abc", created_at="2026-01-01T00:00:00Z", config=c, summary=summary)
            for c in (config, wrapped)]
    runs.append(SimpleNamespace(id="other", created_at="", config={}, summary={"loss": 1.0}))  # not ours: ignored
    api = SimpleNamespace(runs=lambda path: runs if path == "me/ssmcompress" else [])
    remote = tables.records_from_wandb("me/ssmcompress", api)
    assert len(remote) == 2 and remote[0]["headline"] == local["headline"]
    assert all(records.migrate(r) == r for r in remote)  # valid records of the current schema
    assert remote[1]["config"] == local["config"] and remote[0]["flops"] == {"achieved_ratio": 0.1}
    assert remote[0]["metrics"] == local["metrics"] and remote[0]["results_version"] == RESULTS_VERSION
    assert remote[0]["git"] == local["git"] and remote[0]["samples"] is None  # W&B has no per-document values
    for found in ([local], remote[:1]):
        cells = rows(by_name(found)["main_offline_full_mamba2"])
        assert cells[("mamba2-tiny", "10 %", "UTR (ours)")]["Avg"].startswith("55.0")


def test_markdown_latex_and_records_files(tmp_path):
    built = tables.build(tables.frame([record(score=0.6), record("mamba2-tiny", "ours", 0.1, score=0.95),
                                       record("mamba2-tiny", "evit", 0.1, score=0.3),
                                       record("mamba-tiny", "dense", score=0.4)]))
    tables.write(built, tmp_path)
    markdown = (tmp_path / "main_offline_full_mamba2.md").read_text()
    assert markdown.startswith("### Table 1") and "| **95.0 ± " in markdown and "| –" in markdown
    latex = (tmp_path / "main_offline_full_mamba2.tex").read_text()
    body = latex[latex.index("\\begin{tabular}"):latex.index("\\end{tabular}")]
    assert body.startswith("\\begin{tabular}{lllrrrrrrr}\n\\toprule\n")  # booktabs rules, pandas' Styler
    assert body.count("\\toprule") == body.count("\\midrule") == body.count("\\bottomrule") == 1
    assert "\\textbf{95.0 $\\pm$ " in body and " & 10 \\% & " in body and "FLOPs$\\downarrow$" in body
    assert "-- &" in body and "PPL/word & " in body
    caption = latex[latex.index("\\caption"):latex.index("\\label")]
    assert "offline\\_full" in caption and "p $<$ 0.05" in caption and "_full" not in caption.replace("\\_", "")
    assert latex.rstrip().splitlines()[-1].startswith("% ")  # provenance as comments
    importance = (tmp_path / "importance_offline_full.tex").read_text()
    assert "$\\ell$1-norm" in importance
    listed = pd.read_csv(tmp_path / "main_offline_full_mamba2.records.csv", dtype=str)
    assert len(listed) == 3 and set(listed.status) == {"used"} and set(listed.commit) == {"0123456"}
    index = (tmp_path / "README.md").read_text()
    assert "main_offline_full_mamba2.md" in index and "3 of 19 runs" in index
    assert "main_offline_full_mamba2.records.csv" in index
    assert "### Efficiency\n" in (tmp_path / "efficiency.md").read_text()  # no empty "()" in a title

    (tmp_path / "notes.md").write_text("mine")  # rewritten with fewer tables: those no longer made go, not others
    tables.write([t for t in built if t.name != "efficiency"], tmp_path)
    assert not any((tmp_path / f"efficiency{s}").exists() for s in (".md", ".tex", ".records.csv"))
    assert (tmp_path / "notes.md").read_text() == "mine" and (tmp_path / "main_offline_full_mamba2.md").exists()


def test_number_formats():
    assert tables.fmt(0.4256, "acc") == "42.6" and tables.fmt(0.1, "pct") == "10.0 %"
    assert tables.fmt(0.542, "acc", 0.022) == "54.2 ± 2.2" and tables.fmt(0.6, "acc", 0.1, 3) == "60.0 ± 10.0 (n=3)"
    assert tables.fmt(12.345, "num") == "12.35" and tables.fmt(18003621.9, "num") == "1.80e+07"
    assert tables.fmt(1390000.0, "ppl", 310000.0) == "1.39e+06 ± 3.10e+05" and tables.fmt(18.18, "ppl") == "18.18"
    assert tables.fmt(100174.0, "ppl") == "1.00e+05" and tables.fmt(12810.634, "ppl") == "12810.63"
    assert tables.fmt(2.4853, "ppl") == "2.485"  # bits per byte: the digits pruners differ in
    assert tables.fmt(None, "num") == tables.MISSING


def test_make_tables_cli_on_a_real_tiny_sweep(sweep, tmp_path, capsys):
    """The sweep's runs are limited (benchmark.limit=2): left out and listed unless --include-limited."""
    built = {t.name: t for t in tables.main(["--results", str(sweep.results), "--out", str(tmp_path / "default")])}
    assert f"{sweep.distinct} records from" in capsys.readouterr().out
    main = built["main_offline_full_mamba2"]
    assert main.n_missing == main.n_expected == 19 and f"Left out: {sweep.distinct} record(s)" in main.footer()
    built = {t.name: t for t in tables.main(["--results", str(sweep.results), "--out", str(tmp_path),
                                              "--include-limited"])}
    main = built["main_offline_full_mamba2"]
    assert (main.n_expected, main.n_missing) == (19, 19 - sweep.distinct)
    cells = rows(main)
    for method in sweep.methods[1:]:
        for ratio in ("20 %", "30 %"):
            assert " ± " in cells[("mamba2-tiny", ratio, tables.METHODS[method])]["Avg"]  # real stderr
    assert cells[("mamba2-tiny", "0 %", "dense")]["Lastword PPL/word"] != tables.MISSING
    assert all(cells[("mamba2-tiny", "10 %", tables.METHODS[m])]["Avg"] == tables.MISSING for m in sweep.methods[1:])
    assert "Limited runs (benchmark.limit) included." in main.footer()
    for name in ("main_offline_full_mamba2", "main_offline_full_mamba", "importance_offline_full",
                 "location_offline_full", "design_offline_full", "share_offline_full", "efficiency"):
        assert all((tmp_path / f"{name}{suffix}").exists() for suffix in (".md", ".tex", ".records.csv"))


def test_long_context_table_averages_each_length_and_places_the_filter_at_no_flops():
    found = [record("mamba2-tiny", "dense", benchmark="long", score=0.6),
             record("mamba2-tiny", "ours", 0.3, benchmark="long", score=0.4),
             record("mamba2-tiny", "longmamba", None, benchmark="long", score=0.7)]
    built = by_name(found)
    table = built["long"]
    assert list(table.frame.columns) == ["model", "FLOPs↓", "method", "1024 tokens", "2048 tokens", "4096 tokens",
                                         "8192 tokens", "Avg"]
    cells = rows(table)
    se = np.std(documents(0.4), ddof=1) / math.sqrt(DOCS)
    assert cells[("mamba2-tiny", "30 %", "UTR (ours)")]["1024 tokens"] == f"40.0 ± {100 * se / math.sqrt(5):.1f}"
    assert cells[("mamba2-tiny", "30 %", "UTR (ours)")]["Avg"].startswith("40.0 ± ")
    assert cells[("mamba2-tiny", "0 %", "longmamba")]["8192 tokens"].startswith("70.0 ± ")  # no token removed: 0 %
    assert cells[("mamba2-tiny", "0 %", "dense")]["Avg"].startswith("60.0 ± ")
    # dense, ten methods at three budgets, the filter; and Mamba-1's, without the filter (Mamba-2 only)
    assert table.n_expected == (1 + 10 * 3 + 1) + (1 + 10 * 3)
    assert ("mamba2-tiny", "0 %", "longmamba") in cells and ("mamba-tiny", "0 %", "longmamba") not in cells
    assert not [name for name in built if "_long" in name]  # no main_long_*, positional_long_*: the suite is its alone
    assert rows(by_name(found + [record(score=0.9)])["long"]) == cells  # nor does it take the short suite's records
