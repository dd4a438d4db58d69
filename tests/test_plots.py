"""The figures' method styles, the figure summary the notebook tests read, and the committed figures."""
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ssmcompress import plots, tables  # noqa: E402
from ssmcompress.metrics.capture import CUDA_GRAPH  # noqa: E402


def test_every_method_has_its_own_style_in_every_figure():
    styles = {m: plots.style(m) for m in plots.ORDER}
    assert len({s["color"] for s in styles.values()}) == len(plots.ORDER)  # a colour each, markers aside
    assert styles["ours"]["label"] == tables.METHODS["ours"] and styles["dense"]["color"] == "#000000"
    assert plots.style("a_new_method") == plots.style("a_new_method")  # a method no table names: stable too
    assert plots.style("a_new_method")["label"] == "a_new_method"
    assert all(s["color"] != plots.FATES["kept"] for s in styles.values())


def test_accuracy_panel_and_its_summary():
    points = pd.DataFrame([dict(model="m", method="dense", target=0, achieved=0, value=60, error=2),
                           dict(model="m", method="ours", target=20, achieved=19.9, value=55, error=2.5),
                           dict(model="m", method="ours", target=30, achieved=29.9, value=50, error=None),
                           dict(model="m", method="evit", target=20, achieved=20, value=45, error=2)])
    fig, axes = plt.subplots(1, 2)
    for ax in axes:
        plots.accuracy_vs_flops(ax, points)
    axes[0].legend()
    summary = plots.describe(fig)
    plt.close(fig)
    first, second = summary["panels"]
    assert first["xlabel"] == "FLOPs removed (%)" and first["ylabel"] == "accuracy (%)"
    series = {s["label"]: s for s in first["series"]}
    assert series["UTR (ours)"]["points"] == 3 and series["EViT"]["points"] == 2 and series["dense"]["points"] == 1
    assert series["UTR (ours)"]["color"] == plots.style("ours")["color"] and series["UTR (ours)"]["errorbars"]
    assert first["series"] == second["series"] and sorted(first["legend"]) == sorted(series)
    assert second["legend"] == []


def test_token_fates_panel_has_a_legend():
    fig, ax = plt.subplots()
    plots.token_fates(ax, np.array([[0, 1, -1], [0, 2, -1]]), [2, 5], ["a", "b", "c"], "UTR (ours)")
    (panel,) = plots.describe(fig)["panels"]
    plt.close(fig)
    assert panel["legend"] == list(plots.FATES) and panel["title"] == "UTR (ours)"
    assert panel["xlabel"] == "input token (position)"


def test_every_committed_figure_has_one_title_and_one_legend_naming_every_series():
    from ssmcompress.config import REPO

    summaries = sorted((REPO / "results" / "figures").glob("*.json"))
    assert summaries, "no committed figure"
    for path in summaries:
        figure = json.loads(path.read_text())
        assert path.with_suffix(".png").is_file(), path.name
        title = figure.get("title") or ""
        assert title and "\n" not in title and title.count(":") <= 1, (path.name, title)  # one title, not two
        assert len(figure["legends"]) == 1 and figure["legends"][0], path.name
        entries = figure["legends"][0]
        assert len(entries) == len(set(entries)), path.name
        for panel in figure["panels"]:
            assert panel["title"] and panel["xlabel"] and panel["ylabel"], (path.name, panel["title"])
            assert not panel["legend"], (path.name, panel["title"])  # the figure's legend serves every panel
            assert {series["label"] for series in panel["series"]} <= set(entries), (path.name, panel["title"])


def test_accuracy_against_the_measured_speedup():
    points = pd.DataFrame([dict(method="dense", speedup=1.0, value=60, error=2),
                           dict(method="ours", speedup=1.3, value=50, error=2.5),
                           dict(method="ours", speedup=1.1, value=55, error=None),
                           dict(method="evit", speedup=0.9, value=45, error=2)])
    fig, ax = plt.subplots()
    plots.accuracy_vs_speedup(ax, points)
    (panel,) = plots.describe(fig)["panels"]
    xs = {c.get_label(): list(c.lines[0].get_xdata()) for c in ax.containers}
    plt.close(fig)
    assert panel["xlabel"] == "measured speed-up over dense (×)" and panel["ylabel"] == "average accuracy (%)"
    series = {s["label"]: s for s in panel["series"]}
    assert series["UTR (ours)"]["points"] == 3 and series["EViT"]["points"] == 2 and series["dense"]["points"] == 1
    assert xs["UTR (ours)"] == [1.0, 1.1, 1.3]  # from dense, in order of speed


def test_speedup_points_read_the_long_context_speed_tables():
    from test_tables import record

    measured = dict(device="cuda:0", device_name="NVIDIA H100", batch_size=1, length=4096, dense_latency_ms=12.0,
                    reduced_latency_ms=10.0, speedup=1.2, forward_path=CUDA_GRAPH)
    found = [record("mamba2-1.3b", "ours", 0.3, "model.random_init=true", "model.device=cuda", "model.dtype=bfloat16",
                    "benchmark.measure.fvcore=false", "benchmark.measure.capture=true",
                    "benchmark.measure.shape.cuda.batch_size=1", "benchmark.measure.shape.cuda.length=4096",
                    benchmark="efficiency", efficiency=measured, flops=dict(achieved_ratio=0.3))]
    runs = tables.frame(found)
    (table,) = [t for t in tables.build(runs) if t.name.startswith("long_speed")]
    points = plots.speedup_points(table, runs)
    assert points.to_dict("records") == [dict(model="mamba2-1.3b", method="ours", target=30.0, length=4096,
                                              speedup=1.2)]
