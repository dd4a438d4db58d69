"""Paper tables from the results store: layout, best-per-column, missing runs, shared cells across tables, hub
benchmarks, efficiency and pruning tables, W&B records, output files; and the CLI on a real tiny sweep."""
import functools
import json
from types import SimpleNamespace

import pytest
from hydra import compose, initialize_config_dir

from ssmcompress import tables, tracking
from ssmcompress.config import CONF_DIR, available, register_resolvers, run_key, to_dict
from sweep_fixture import tiny_sweep

sweep = pytest.fixture(scope="session")(tiny_sweep)
OFFLINE = ["shakespeare_lastword", "shakespeare_continuation", "mqar", "story_qa"]


@functools.lru_cache(maxsize=None)
def composed(overrides: tuple) -> str:
    register_resolvers()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        return json.dumps(to_dict(compose("config", overrides=["logger=none", *overrides])))


def record(model="mamba2-tiny", method="dense", ratio=None, *extra, score=0.5, benchmark="offline", time="2026-01-01",
           pruner=None, sparsity=None, **sections):
    """A record as the runner writes it, for a composed config (scores: every task `score`, PPL 10/score)."""
    overrides = (f"model={model}", f"method={method}", f"benchmark={benchmark}", *extra,
                 *((f"ratio={ratio}",) if ratio is not None else ()))
    config = json.loads(composed(overrides))
    if pruner:  # pruner configs arrive with the pruning work: set it as the runner would record it
        config["pruner"], config["sparsity"] = {"name": pruner}, sparsity
    bench = config["benchmark"]  # as evaluation.harness.headline: scored tasks, extra metrics, average
    headline = {t: score for t in bench.get("tasks", []) if t in bench.get("main_metric", {})}
    for task, extras in (bench.get("extra_metrics") or {}).items():
        headline.update({f"{task}/{m}": 10 / score if "perplexity" in m else score for m in extras})
    if headline:
        headline["average"] = score
    generation = 2 if config["model"]["config"]["ssm_cfg"]["layer"] == "Mamba2" else 1
    return dict(key=run_key(config), time=time, config=config, model=model, method=method,
                benchmark=config["benchmark"]["name"], ratio=None if method == "dense" else ratio,
                layers=None if method == "dense" else config["layers"], protocol=config["protocol"], seed=0,
                pruner=pruner or "none", sparsity=sparsity, tag=None, model_info=dict(generation=generation),
                env=dict(cpu="x86_64"), headline=headline, **sections)


def by_name(records):
    return {table.name: table for table in tables.build(tables.frame(records))}


def rows(table):
    """{(block labels..., row label): {column: shown value}}, block labels carried down."""
    frame = table.frame.replace("", None).ffill()
    n = len(table.axes)
    return {tuple(r[:n]): dict(zip(frame.columns[n:], r[n:])) for r in frame.itertuples(index=False)}


def bold(table, key, column):
    frame = table.frame.replace("", None).ffill()
    n = len(table.axes)
    index = next(i for i, r in enumerate(frame.itertuples(index=False)) if tuple(r[:n]) == key)
    return bool(table.bold.iloc[index][column])


def test_main_table_layout_best_per_block_and_missing_runs():
    records = [record(score=0.6), record("mamba2-tiny", "ours", 0.1, score=0.55),
               record("mamba2-tiny", "evit", 0.1, score=0.3), record("mamba2-tiny", "ours", 0.2, score=0.5),
               record("mamba2-tiny", "ours", 0.2, "method.importance=l1", score=0.1),  # ablation, not Table 1
               record("mamba2-tiny", "dense", None, "seed=1", score=0.9, pruner="magnitude", sparsity=0.5)]
    built = by_name(records)
    table = built["main_offline_mamba2"]
    assert table.title.startswith("Table 1 — Main accuracy (Mamba-2")
    assert list(table.frame.columns) == ["model", "FLOPs↓", "method", "Lastword PPL", "Lastword", "Continuation",
                                         "MQAR", "StoryQA", "Avg"]
    cells = rows(table)
    assert list(cells)[0] == ("mamba2-tiny", "0 %", "dense") and cells[list(cells)[0]]["Avg"] == "60.0"
    assert cells[("mamba2-tiny", "10 %", "UTR (ours)")] == {"Lastword PPL": "18.18", "Lastword": "55.0",
                                                           "Continuation": "55.0", "MQAR": "55.0",
                                                           "StoryQA": "55.0", "Avg": "55.0"}
    assert set(cells[("mamba2-tiny", "10 %", "PuMer")].values()) == {tables.MISSING}  # shown, not dropped
    assert (table.n_expected, table.n_missing) == (1 + 6 * 3, 1 + 6 * 3 - 4)
    assert "Missing: 15 of 19 runs" in table.markdown()
    # best per column within each model x budget block: higher accuracy, lower perplexity; alone = not bold
    assert bold(table, ("mamba2-tiny", "10 %", "UTR (ours)"), "Avg")
    assert bold(table, ("mamba2-tiny", "10 %", "UTR (ours)"), "Lastword PPL")
    assert not bold(table, ("mamba2-tiny", "10 %", "EViT"), "Avg")
    assert not bold(table, ("mamba2-tiny", "20 %", "UTR (ours)"), "Avg")
    assert not table.bold.iloc[0].any()
    assert built["main_offline_mamba"].n_missing == built["main_offline_mamba"].n_expected == 19  # Table 2 too

    # one run fills its cell in every table it belongs to; the ablated run only its own
    importance = rows(built["importance_offline"])
    assert importance[("mamba2-tiny", "20 %", "Clip (ours)")]["Avg"] == "50.0"
    assert importance[("mamba2-tiny", "20 %", "ℓ1-norm")]["Avg"] == "10.0"
    assert rows(built["location_offline"])[("mamba2-tiny", "20 %", "default")]["Avg"] == "50.0"
    assert rows(built["share_offline"])[("mamba2-tiny", "20 %", "0.5")]["Avg"] == "50.0"
    assert rows(built["design_offline"])[("mamba2-tiny", "30 %", "q = 0.5 / M-only")]["Avg"] == tables.MISSING


def test_schedule_and_positional_tables():
    records = [record("mamba2-tiny", "ours", 0.2, score=0.5), record("mamba2-tiny", "ours", 0.2, "schedule=chunk",
                                                                     score=0.4),
               record("mamba2-tiny", "early", 0.2, score=0.3)]
    built = by_name(records)
    schedule = rows(built["schedule_offline"])
    assert schedule[("mamba2-tiny", "20 %", "UTR (ours)", "smooth")]["Avg"] == "50.0"
    assert schedule[("mamba2-tiny", "20 %", "UTR (ours)", "chunk")]["Avg"] == "40.0"
    assert set(schedule[("mamba2-tiny", "10 %", "EViT", "chunk")].values()) == {tables.MISSING}  # the sweep's grid
    main = rows(built["main_offline_mamba2"])  # a chunk run is not the main table's
    assert main[("mamba2-tiny", "20 %", "UTR (ours)")]["Avg"] == "50.0" and "runs with other settings" not in \
        built["main_offline_mamba2"].footer()
    positional = rows(built["positional_offline_mamba2"])
    assert positional[("mamba2-tiny", "20 %", "early")]["Avg"] == "30.0"
    assert positional[("mamba2-tiny", "20 %", "UTR (ours)")]["Avg"] == "50.0"
    assert built["positional_offline_mamba2"].n_expected == 1 + 10 * 3


def test_ablation_rows_and_hub_benchmarks():
    records = [record("mamba2-tiny", "ours", 0.3, "method.hidden=merge", "method.residual=merge", score=0.2),
               record("mamba2-tiny", "ours", 0.3, "method.hidden=hybrid", "method.residual=hybrid",
                      "method.hidden_q=0.8", "method.residual_q=0.2", score=0.3),
               record("mamba2-tiny", "ours", 0.3, "method.q=0.9", score=0.4),  # in no design row: added as is
               record("mamba2-tiny", "ours", 0.2, "layers=[1,2,3,4,5,6,7]", score=0.45),
               record("mamba2-2.7b", "dense", None, benchmark="paper6", score=0.64),
               record("mamba2-2.7b", "ours", 0.2, benchmark="paper6", score=0.59)]
    built = by_name(records)
    design = rows(built["design_offline"])
    assert design[("mamba2-tiny", "30 %", "M-only / M-only")]["Avg"] == "20.0"
    assert design[("mamba2-tiny", "30 %", "q = 0.8 / q = 0.2")]["Avg"] == "30.0"
    assert design[("mamba2-tiny", "30 %", "P-only / P-only")]["Avg"] == tables.MISSING
    assert rows(built["share_offline"])[("mamba2-tiny", "30 %", "0.9")]["Avg"] == "40.0"
    assert rows(built["location_offline"])[("mamba2-tiny", "20 %", "[1,2,3,4,5,6,7]")]["Avg"] == "45.0"

    hub = built["main_paper6_mamba2"]  # a hub model's runs make their own table, the benchmark's columns
    assert list(hub.frame.columns)[3:] == ["LAMBADA PPL", "LAMBADA", "HellaSwag", "PIQA", "ARC-E", "ARC-C",
                                           "WinoGrande", "Avg"]
    assert rows(hub)[("mamba2-2.7b", "20 %", "UTR (ours)")]["Avg"] == "59.0"
    assert (hub.n_expected, hub.n_missing) == (19, 17)
    location = rows(built["location_paper6"])  # the paper's Table 4 rows, from ablation_location_hub.yaml
    assert location[("mamba2-2.7b", "20 %", "default")]["Avg"] == "59.0"
    assert ("mamba2-2.7b", "20 %", "[20,25,30,35,40,45,50]") in location
    assert "importance_paper6" not in built  # no ablated run of that model: no table of missing rows


def test_rerun_of_a_config_counts_once_and_the_latest_wins():
    first = record("mamba2-tiny", "ours", 0.1, score=0.2, time="2026-01-01T10:00:00")
    again = dict(record("mamba2-tiny", "ours", 0.1, score=0.3, time="2026-01-02T10:00:00"), run_id="b")
    df = tables.frame([again, first])
    assert len(df) == 1 and df.attrs["duplicates"] == 1
    assert rows(by_name([first, again])["main_offline_mamba2"])[("mamba2-tiny", "10 %", "UTR (ours)")]["Avg"] == "30.0"


def test_other_settings_in_one_cell_and_partial_runs_are_flagged():
    records = [record("mamba2-tiny", "ours", 0.1, score=0.2, time="2026-01-01"),
               record("mamba2-tiny", "ours", 0.1, "seed=1", score=0.3, time="2026-01-02"),
               record("mamba2-tiny", "evit", 0.1, "benchmark.tasks=[mqar]", score=0.4),
               record("mamba2-tiny", "ours", 0.4, score=0.1)]  # a budget outside the sweep: added, with its block
    table = by_name(records)["main_offline_mamba2"]
    cells = rows(table)
    assert cells[("mamba2-tiny", "10 %", "UTR (ours)")]["Avg"] == "30.0"
    assert any("2 runs with other settings" in note for note in table.notes)
    assert cells[("mamba2-tiny", "10 %", "EViT")]["MQAR"] == "40.0"
    assert cells[("mamba2-tiny", "10 %", "EViT")]["Avg"] == tables.MISSING  # fewer tasks: no comparable average
    assert cells[("mamba2-tiny", "40 %", "UTR (ours)")]["Avg"] == "10.0"
    assert set(cells[("mamba2-tiny", "40 %", "EViT")].values()) == {tables.MISSING}


def efficiency(method, ratio=None, latency=10.0, **extra):
    fields = {"device": "cpu", "batch_size": 1, "length": 64, "dense_latency_ms": 10.0, "dense_tokens_per_s": 6400.0,
              "dense_peak_mib": 100.0, "dense_activation_mib": 10.0}
    if method != "dense":
        fields.update(reduced_latency_ms=latency, reduced_tokens_per_s=64000 / latency, reduced_peak_mib=90.0,
                      reduced_activation_mib=8.0, speedup=10.0 / latency, peak_memory_saving=0.1,
                      reduction_overhead=0.01, ceiling_latency_ms=6.25, ceiling_speedup=1.6,
                      of_ceiling=10.0 / latency / 1.6)
    fields.update(extra)
    return record("mamba2-tiny", method, ratio, f"benchmark.measure.shape.cpu.batch_size={fields['batch_size']}",
                  benchmark="efficiency", efficiency=fields,
                  flops=dict(achieved_ratio=ratio or 0.0))


def test_efficiency_table():
    built = by_name([efficiency("dense"), efficiency("ours", 0.2, latency=8.0), efficiency("evit", 0.2, latency=7.5),
                     record("mamba2-tiny", "ours", 0.2), efficiency("ours", 0.2, latency=5.0, batch_size=8)])
    table = built["efficiency_x86_64_batch-1-x-64"]  # one table per device and input shape
    cells = rows(table)
    assert cells[("mamba2-tiny", "0 %", "dense")]["speed-up"] == "1.00"
    assert cells[("mamba2-tiny", "20 %", "UTR (ours)")] == {
        "FLOPs↓ achieved": "20.0 %", "latency ms": "8.00", "tokens/s": "8000.00", "peak MiB": "90.00",
        "activation MiB": "8.00", "speed-up": "1.25", "of ideal": "100.0 %", "of ceiling": "78.1 %",
        "overhead": "1.0 %", "peak memory saving": "10.0 %"}
    assert bold(table, ("mamba2-tiny", "20 %", "EViT"), "speed-up")
    assert bold(table, ("mamba2-tiny", "20 %", "EViT"), "latency ms")
    assert not bold(table, ("mamba2-tiny", "20 %", "UTR (ours)"), "speed-up")
    # a device's table lists the models measured there (not every model of the efficiency sweep)
    assert table.n_expected == 19 and "Input shape (batch x length): 1x64." in table.notes
    assert rows(built["efficiency_x86_64_batch-8-x-64"])[("mamba2-tiny", "20 %", "UTR (ours)")]["speed-up"] == "2.00"


def test_pruning_and_joint_tables():
    if not (tables.EXPERIMENTS / "pruning_joint.yaml").exists():
        pytest.skip("experiments/pruning.yaml and pruning_joint.yaml (issue #8) are not there yet")
    bench = "pruning" if "pruning" in available("benchmark") else "offline"  # #8's: offline + held-out perplexity
    dense = functools.partial(record, "mamba2-tiny", "dense", None, benchmark=bench)
    ours = functools.partial(record, "mamba2-tiny", "ours", 0.2, benchmark=bench)
    records = [dense(score=0.6), dense(score=0.5, pruner="magnitude", sparsity=0.5),
               dense(score=0.55, pruner="wanda", sparsity=0.5), dense(score=0.4, pruner="wanda", sparsity="2:4"),
               ours(score=0.45), ours(score=0.35, pruner="wanda", sparsity=0.5), record(score=0.7)]
    built = by_name(records)
    pruning, joint = built["pruning" if bench == "pruning" else "pruning_offline"], built[f"joint_{bench}"]
    if bench == "pruning":
        assert list(pruning.frame.columns) == [
            "model", "sparsity", "pruner", "Held-out word PPL", "Held-out bits/byte", "Lastword PPL", "Lastword",
            "Continuation", "MQAR", "StoryQA", "Avg"]
    cells = rows(pruning)
    assert cells[("mamba2-tiny", "0 %", "none")]["Avg"] == "60.0"
    assert cells[("mamba2-tiny", "50 %", "wanda")]["Avg"] == "55.0"
    assert cells[("mamba2-tiny", "2:4", "magnitude")]["Avg"] == tables.MISSING
    assert bold(pruning, ("mamba2-tiny", "50 %", "wanda"), "Avg")
    cells = rows(joint)
    assert cells[("mamba2-tiny", "none", "0 %", "0 %", "dense")]["Avg"] == "60.0"
    assert cells[("mamba2-tiny", "none", "0 %", "20 %", "UTR (ours)")]["Avg"] == "45.0"
    assert cells[("mamba2-tiny", "wanda", "50 %", "20 %", "UTR (ours)")]["Avg"] == "35.0"
    assert cells[("mamba2-tiny", "wanda", "2:4", "20 %", "UTR (ours)")]["Avg"] == tables.MISSING
    main = rows(built["main_offline_mamba2"])
    assert main[("mamba2-tiny", "0 %", "dense")]["Avg"] == "70.0"  # pruned runs stay out of Table 1


def test_records_from_wandb_match_the_local_store():
    local = record("mamba2-tiny", "ours", 0.1, score=0.55, metrics={"mqar": {"acc": 0.55}},
                   flops={"achieved_ratio": 0.1})
    summary = {"key": local["key"]}  # as tracking.WandbLogger.log writes it
    for section in ("metrics", "headline", "flops"):
        summary.update(tracking._flatten(local[section], section))
    wrapped = {k: {"value": v, "desc": None} for k, v in local["config"].items()}
    runs = [SimpleNamespace(id="abc", created_at="2026-01-01T00:00:00Z", config=config, summary=summary)
            for config in (local["config"], wrapped)]
    runs.append(SimpleNamespace(id="other", created_at="", config={}, summary={"loss": 1.0}))  # not ours: ignored
    api = SimpleNamespace(runs=lambda path: runs if path == "me/ssmcompress" else [])
    remote = tables.records_from_wandb("me/ssmcompress", api)
    assert len(remote) == 2 and remote[0]["headline"] == local["headline"]
    assert remote[1]["config"] == local["config"] and remote[0]["flops"] == {"achieved_ratio": 0.1}
    assert remote[0]["metrics"] == {"mqar": {"acc": 0.55}}
    for records in ([local], remote[:1]):
        cells = rows(by_name(records)["main_offline_mamba2"])
        assert cells[("mamba2-tiny", "10 %", "UTR (ours)")]["Avg"] == "55.0"


def test_markdown_and_latex_files(tmp_path):
    built = tables.build(tables.frame([record(score=0.6), record("mamba2-tiny", "ours", 0.1, score=0.55),
                                       record("mamba2-tiny", "evit", 0.1, score=0.3),
                                       record("mamba-tiny", "dense", score=0.4)]))
    tables.write(built, tmp_path)
    markdown = (tmp_path / "main_offline_mamba2.md").read_text()
    assert markdown.startswith("### Table 1") and "| **55.0** " in markdown and "| –" in markdown
    latex = (tmp_path / "main_offline_mamba2.tex").read_text()
    assert "\\begin{tabular}{lllrrrrrr}" in latex and "\\textbf{55.0}" in latex and "10 \\%" in latex
    assert "FLOPs$\\downarrow$" in latex and "--" in latex and "\\bottomrule" in latex
    importance = (tmp_path / "importance_offline.tex").read_text()
    assert "$\\ell$1-norm" in importance and importance.count("\\midrule") == 2  # header rule + one between models
    index = (tmp_path / "README.md").read_text()
    assert "main_offline_mamba2.md" in index and "3 of 19 runs" in index
    assert "### Efficiency\n" in (tmp_path / "efficiency.md").read_text()  # no empty "()" in a title

    (tmp_path / "notes.md").write_text("mine")  # rewritten with fewer tables: those no longer made go, not others
    tables.write([t for t in built if t.name != "efficiency"], tmp_path)
    assert not (tmp_path / "efficiency.md").exists() and not (tmp_path / "efficiency.tex").exists()
    assert (tmp_path / "notes.md").read_text() == "mine" and (tmp_path / "main_offline_mamba2.md").exists()


def test_number_formats():
    assert tables.fmt(0.4256, "acc") == "42.6" and tables.fmt(0.1, "pct") == "10.0 %"
    assert tables.fmt(12.345, "num") == "12.35" and tables.fmt(18003621.9, "num") == "1.80e+07"
    assert tables.fmt(None, "num") == tables.MISSING


def test_make_tables_cli_on_a_real_tiny_sweep(sweep, tmp_path, capsys):
    built = {t.name: t for t in tables.main(["--results", str(sweep.results), "--out", str(tmp_path)])}
    assert f"{sweep.distinct} records from" in capsys.readouterr().out
    main = built["main_offline_mamba2"]
    assert (main.n_expected, main.n_missing) == (19, 19 - sweep.distinct)
    cells = rows(main)
    for method in sweep.methods[1:]:
        for ratio in ("20 %", "30 %"):
            assert cells[("mamba2-tiny", ratio, tables.METHODS[method])]["Avg"] != tables.MISSING
    assert cells[("mamba2-tiny", "0 %", "dense")]["Lastword PPL"] != tables.MISSING
    assert all(cells[("mamba2-tiny", "10 %", tables.METHODS[m])]["Avg"] == tables.MISSING for m in sweep.methods[1:])
    for name in ("main_offline_mamba2", "main_offline_mamba", "importance_offline", "location_offline",
                 "design_offline", "share_offline", "efficiency"):
        assert (tmp_path / f"{name}.md").exists() and (tmp_path / f"{name}.tex").exists()
