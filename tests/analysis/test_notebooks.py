"""The analysis notebooks run headless (papermill, kernelspec python3) on the real tiny sweep's results store, and
their figures show what they should: one series per method, in the method's colour in every panel and figure,
error bars, labelled axes with units, legends (read from the JSON summary each notebook writes beside a figure)."""
import json

import nbformat
import papermill
import pytest

from ssmcompress import plots, tables
from ssmcompress.config import REPO
from sweep_fixture import RATIOS, tiny_sweep

sweep = pytest.fixture(scope="session")(tiny_sweep)
NOTEBOOKS = sorted(p.stem for p in (REPO / "analysis").glob("*.ipynb"))
FIGURES = {"accuracy_vs_flops": ["accuracy_vs_flops"], "token_reduction": ["tokens_per_layer", "token_fates"]}


def test_notebooks_have_a_kernelspec_and_a_parameters_cell():
    assert set(NOTEBOOKS) >= {"tables", "accuracy_vs_flops", "token_reduction"}
    for name in NOTEBOOKS:
        notebook = nbformat.read(REPO / "analysis" / f"{name}.ipynb", as_version=4)
        nbformat.validate(notebook)
        assert notebook.metadata.kernelspec.name == "python3"
        parameters = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(parameters) == 1 and "results_dir = None" in parameters[0].source
        assert "include_limited = False" in parameters[0].source
        assert not any(c.get("outputs") for c in notebook.cells if c.cell_type == "code"), f"{name}: clear outputs"


def run_notebook(name, sweep, tmp_path, figures=None, **more) -> str:
    parameters = dict(results_dir=str(sweep.results), include_limited=True, **more)  # the tiny sweep is limited
    if name != "tables":
        parameters["figures_dir"] = str(tmp_path / "figures")
    output = tmp_path / f"{name}.ipynb"
    papermill.execute_notebook(REPO / "analysis" / f"{name}.ipynb", output, parameters=parameters,
                               kernel_name="python3", cwd=str(REPO / "analysis"), progress_bar=False)
    executed = nbformat.read(output, as_version=4)
    for figure in FIGURES.get(name, []) if figures is None else figures:
        assert (tmp_path / "figures" / f"{figure}.png").stat().st_size > 0
    return "".join(o.get("text", "") + str(o.get("data", {}).get("text/markdown", ""))
                   for cell in executed.cells for o in cell.get("outputs", []))


def summary(tmp_path, figure) -> dict:
    return json.loads((tmp_path / "figures" / f"{figure}.json").read_text())


def test_tables_notebook(sweep, tmp_path):
    text = run_notebook("tables", sweep, tmp_path)
    assert "Table 1 — Main accuracy" in text and "Missing: " in text and "Records: " in text


def test_accuracy_vs_flops_notebook(sweep, tmp_path):
    run_notebook("accuracy_vs_flops", sweep, tmp_path)
    figure = summary(tmp_path, "accuracy_vs_flops")
    reduced = [plots.style(m)["label"] for m in sweep.methods[1:]]
    panels = figure["panels"]
    assert [p["title"] for p in panels] == [f"mamba2-tiny: {c}" for c in
                                            ("Avg", "Lastword", "Continuation", "MQAR", "StoryQA")]
    for panel in panels:
        assert panel["xlabel"] == "FLOPs removed (%)" and panel["ylabel"].endswith("accuracy (%)")
        series = {s["label"]: s for s in panel["series"]}
        assert sorted(series) == sorted(reduced + ["dense"])  # one line per method, and the dense point
        for method in sweep.methods:
            style = plots.style(method)
            assert (series[style["label"]]["color"], series[style["label"]]["marker"]) == (style["color"],
                                                                                         style["marker"])
            assert series[style["label"]]["errorbars"]  # from the records' standard errors
        assert all(series[label]["points"] == 1 + len(RATIOS) for label in reduced)  # dense, then each budget
    assert set(figure["legends"][0]) == set(reduced + ["dense"])
    colours = {(s["label"], s["color"]) for p in panels for s in p["series"]}
    assert len(colours) == len(sweep.methods)  # the same colour for a method in every panel


def test_accuracy_vs_flops_of_another_table(sweep, tmp_path):
    """`table` picks the table whose cells are plotted (the positional baselines' sweep shares dense, UTR and EViT
    with the main one), and names the figure after it."""
    run_notebook("accuracy_vs_flops", sweep, tmp_path, ["accuracy_vs_flops_positional"], table="positional")
    figure = summary(tmp_path, "accuracy_vs_flops_positional")
    assert not (tmp_path / "figures" / "accuracy_vs_flops.png").exists()
    assert figure["panels"][0]["title"] == "mamba2-tiny: Avg"
    assert {s["label"] for s in figure["panels"][0]["series"]} == {plots.style(m)["label"] for m in sweep.methods}


def test_token_reduction_notebook(sweep, tmp_path):
    text = run_notebook("token_reduction", sweep, tmp_path)
    assert "no token-reduction runs" not in text
    (panel,) = summary(tmp_path, "tokens_per_layer")["panels"]
    assert panel["xlabel"] == "layer (index)" and panel["ylabel"] == "tokens entering the layer (count)"
    assert sorted(panel["legend"]) == sorted(plots.style(m)["label"] for m in sweep.methods)
    for entry in panel["series"]:  # the colours of the accuracy figure
        method = next(m for m in sweep.methods if plots.style(m)["label"] == entry["label"])
        assert entry["color"] == plots.style(method)["color"] and entry["points"] == 4  # the tiny sweep's layers
    fates = summary(tmp_path, "token_fates")["panels"]
    assert sorted(p["title"] for p in fates) == sorted(tables.METHODS[m] for m in sweep.methods[1:])
    assert all(p["legend"] == list(plots.FATES) and p["xlabel"] and p["ylabel"] for p in fates)


def test_accuracy_vs_speed_notebook(tmp_path):
    """Long-suite accuracies of a bundled model against the speed-ups of its paired size, per prompt length."""
    from ssmcompress import tracking
    from ssmcompress.metrics.capture import CUDA_GRAPH
    from test_tables import record

    store = tmp_path / "store"
    tracking.append(record("mamba2-tiny", "dense", benchmark="long", score=0.6), store)
    for method, score in (("ours", 0.5), ("evit", 0.4)):
        tracking.append(record("mamba2-tiny", method, 0.3, benchmark="long", score=score), store)
        for length in (1024, 2048, 4096, 8192):
            measured = dict(device="cuda:0", device_name="NVIDIA H100", batch_size=1, length=length, speedup=1.2,
                            dense_latency_ms=12.0, reduced_latency_ms=10.0, forward_path=CUDA_GRAPH)
            tracking.append(record("mamba2-1.3b", method, 0.3, "model.random_init=true", "model.device=cuda",
                                   "model.dtype=bfloat16", "benchmark.measure.fvcore=false",
                                   "benchmark.measure.capture=true", "benchmark.measure.shape.cuda.batch_size=1",
                                   f"benchmark.measure.shape.cuda.length={length}", benchmark="efficiency",
                                   efficiency=measured, flops=dict(achieved_ratio=0.3)), store)
    sweep = type("Store", (), {"results": store})
    text = run_notebook("accuracy_vs_speed", sweep, tmp_path, figures=["accuracy_vs_speed_mamba2-tiny"])
    assert "long: 3 of 63 runs" in text
    figure = summary(tmp_path, "accuracy_vs_speed_mamba2-tiny")
    assert [p["title"] for p in figure["panels"]] == ["1024 tokens", "2048 tokens", "4096 tokens", "8192 tokens"]
    for panel in figure["panels"]:
        series = {s["label"]: s for s in panel["series"]}
        assert series["UTR (ours)"]["points"] == series["EViT"]["points"] == 2 and series["dense"]["points"] == 1
        assert panel["xlabel"] == "measured speed-up over dense (×)"
    assert sorted(figure["legends"][0]) == sorted(["UTR (ours)", "EViT", "dense"])
    assert not (tmp_path / "figures" / "accuracy_vs_speed_mamba-tiny.png").exists()  # no run of it
