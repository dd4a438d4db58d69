"""The figures of the analysis notebooks: one colour and marker per method in every figure, error bars from the
records' standard errors, legends, axis labels with units; `describe` says what a figure shows (its tests read it).
"""
from __future__ import annotations

import zlib

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.colors import ListedColormap, to_hex
from matplotlib.container import ErrorbarContainer
from matplotlib.patches import Patch

from ssmcompress.tables import METHODS, Table

# every method the tables name, in one order: a method's colour does not depend on which runs a figure shows
ORDER = ("dense", *METHODS)
# tab10 (grey left out: it marks kept tokens), then six hues none of its colours is near: one colour per method
PALETTE = [to_hex(c) for c in matplotlib.colormaps["tab10"].colors if to_hex(c) != "#7f7f7f"] + [
    "#000080", "#ffd700", "#800000", "#00e000", "#ff00ff", "#008080"]
MARKERS = "osD^v<>pP*Xhd"
DENSE = dict(color="#000000", marker="o")
# token fates in the reducer's trace (reduction.patch: KEPT, PRUNED, MERGED), and tokens gone at an earlier layer
FATES = {"gone at an earlier layer": "#ffffff", "kept": "#d9d9d9", "pruned": "#d62728", "merged": "#1f77b4"}


def style(method: str) -> dict:
    """Colour, marker and legend label of a method, the same in every figure (a method the tables do not name
    gets a slot from its name's checksum, so it is stable across runs too)."""
    if method == "dense":
        return dict(DENSE, label="dense")
    slot = ORDER.index(method) - 1 if method in ORDER else len(ORDER) + zlib.crc32(method.encode())
    return dict(color=PALETTE[slot % len(PALETTE)], marker=MARKERS[slot % len(MARKERS)],
                label=METHODS.get(method, method))


def achieved_ratio(row: dict) -> float:
    """The FLOPs fraction the reducer removed during evaluation (short inputs are reduced less than the target),
    else the one measured on the synthetic batch, else the target."""
    observed = (row["reduction"].get("observed") or {}).get("achieved_ratio")
    return observed if observed is not None else row["flops"].get("achieved_ratio", row["ratio"])


def accuracy_points(table: Table, runs: pd.DataFrame, column: str) -> pd.DataFrame:
    """One point per filled cell of a table with model, ratio and method axes: the FLOPs removed (mean over the
    cell's runs), the column's value and its standard error (or standard deviation over seeds), in %."""
    by_id = {row["run_id"]: row for row in runs.to_dict("records")}
    points = []
    for i, key in enumerate(table.keys):
        cell = dict(zip(table.axes, key))
        found = table.values.loc[i, column]
        if found is None or not table.used[i]:
            continue
        error = table.spread.loc[i, column]
        points.append(dict(model=cell["model"], method=cell["method"], target=100 * cell["ratio"],
                           achieved=100 * float(np.mean([achieved_ratio(by_id[r]) for r in table.used[i]])),
                           value=100 * found, error=None if error is None else 100 * error))
    return pd.DataFrame(points, columns=["model", "method", "target", "achieved", "value", "error"])


def method_curves(ax, points: pd.DataFrame, x: str) -> None:
    """Per method a line from the dense point through its budgets, ordered by column `x`, with standard-error bars
    on `value`; the dense point on top."""
    dense = points[points.method == "dense"]
    for method in [m for m in ORDER if m in set(points.method)] + sorted(set(points.method) - set(ORDER)):
        if method == "dense":
            continue
        curve = pd.concat([dense, points[points.method == method]]).sort_values(x)
        ax.errorbar(curve[x], curve.value, yerr=curve.error.fillna(0).to_numpy(dtype=float), capsize=2,
                    linewidth=1.2, markersize=4, **style(method))
    if len(dense):
        ax.errorbar(dense[x], dense.value, yerr=dense.error.fillna(0).to_numpy(dtype=float), capsize=2,
                    linestyle="none", markersize=6, zorder=3, **style("dense"))
    ax.grid(alpha=0.3)


def accuracy_vs_flops(ax, points: pd.DataFrame, ylabel: str = "accuracy (%)") -> None:
    """Per method a line from the dense point through its budgets, accuracy against the FLOPs removed."""
    method_curves(ax, points, "achieved")
    ax.set(xlabel="FLOPs removed (%)", ylabel=ylabel)


def speedup_points(table: Table, runs: pd.DataFrame) -> pd.DataFrame:
    """One point per filled cell of an efficiency table (model, ratio and method axes): the prompt length its runs
    were measured at, the budget (% of the FLOPs removed) and the measured speed-up over dense."""
    shapes = dict(zip(runs.run_id, runs["shape"]))
    points = []
    for i, key in enumerate(table.keys):
        cell = dict(zip(table.axes, key))
        found = table.values.loc[i, "speed-up"]
        if found is not None and table.used[i]:
            length = int(shapes[table.used[i][0]].rsplit(" x ", 1)[1])
            points.append(dict(model=cell["model"], method=cell["method"], target=100 * cell["ratio"],
                               length=length, speedup=found))
    return pd.DataFrame(points, columns=["model", "method", "target", "length", "speedup"])


def accuracy_vs_speedup(ax, points: pd.DataFrame, ylabel: str = "average accuracy (%)") -> None:
    """Per method a line from the dense point (speed-up 1) through its budgets, accuracy against the speed-up
    measured at the same budget and prompt length (points: method, speedup, value, error)."""
    method_curves(ax, points, "speedup")
    ax.axvline(1.0, color="#808080", linewidth=0.8, linestyle=":")  # slower than dense on its left
    ax.set(xlabel="measured speed-up over dense (×)", ylabel=ylabel)


def tokens_per_layer(ax, counts: pd.DataFrame) -> None:
    """Tokens entering each layer (rows: layers, columns: methods), one line per method."""
    for method in counts.columns:
        ax.plot(counts.index, counts[method], linewidth=1.2, markersize=4, alpha=0.9, **style(method))
    ax.set_xticks(counts.index)
    ax.set(xlabel="layer (index)", ylabel="tokens entering the layer (count)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


def token_fates(ax, fates: np.ndarray, layers: list[int], words: list[str], title: str) -> None:
    """One row per reduction layer, one column per input token: kept, pruned, merged, or gone (fates: -1 gone,
    else the trace's code + 0) — coloured as FATES, with a legend."""
    ax.imshow(fates + 1, cmap=ListedColormap(list(FATES.values())), vmin=0, vmax=len(FATES) - 1, aspect="auto",
              interpolation="nearest")
    ax.set_yticks(range(len(layers)), [f"layer {layer}" for layer in layers])
    ax.set_xticks(range(len(words)), words, rotation=90, fontsize=7)
    ax.set(title=title, xlabel="input token (position)", ylabel="reduction layer")
    ax.legend(handles=[Patch(facecolor=c, edgecolor="#808080", label=name) for name, c in FATES.items()],
              loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")


def describe(fig) -> dict:
    """What a figure shows, as JSON: its title; per panel its title, axis labels, legend entries and data series
    (label, colour, marker, number of points, whether it has error bars); the figure's own legends."""
    panels = []
    for ax in fig.axes:
        series = []
        in_containers = set()
        for container in ax.containers:
            if isinstance(container, ErrorbarContainer):
                line = container.lines[0]
                in_containers.add(id(line))
                series.append(dict(label=container.get_label(), color=to_hex(line.get_color()),
                                   marker=line.get_marker(), points=len(line.get_xdata()), errorbars=True))
        for line in ax.get_lines():
            if id(line) not in in_containers and not line.get_label().startswith("_"):
                series.append(dict(label=line.get_label(), color=to_hex(line.get_color()),
                                   marker=line.get_marker(), points=len(line.get_xdata()), errorbars=False))
        legend = ax.get_legend()
        panels.append(dict(title=ax.get_title(), xlabel=ax.get_xlabel(), ylabel=ax.get_ylabel(), series=series,
                           legend=[t.get_text() for t in legend.get_texts()] if legend else []))
    title = fig._suptitle.get_text() if fig._suptitle is not None else ""  # matplotlib keeps no public getter
    return dict(title=title, panels=panels,
                legends=[[t.get_text() for t in legend.get_texts()] for legend in fig.legends])
