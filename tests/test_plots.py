"""The figures' method styles, the figure summary the notebook tests read, and the committed figures."""
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ssmcompress import plots, tables  # noqa: E402


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
