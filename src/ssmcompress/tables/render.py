"""A built table, and its text: numbers and axis values as shown, Markdown (`DataFrame.to_markdown`) and LaTeX
(pandas' `Styler.to_latex`, booktabs rules)."""
from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

MISSING = "–"
BEST, TIED = "best", "tied"  # the marks: best of its block beyond doubt / not significantly worse than the best
METHODS = {"ours": "UTR (ours)", "official": "UTR (official code)", "evit": "EViT", "pumer": "PuMer",
           "tome": "ToMe", "random": "random", "prune_only": "prune only", "merge_only": "merge only",
           "early": "early", "early_merge": "early, merged", "strided": "strided", "late": "late",
           "utr_early": "UTR, early window", "ceiling": "ceiling (cut only)"}
HEADERS = {"ratio": "FLOPs↓", "design": "hidden / residual", "method.importance": "metric"}
VALUES = {"method.importance": {"l1": "ℓ1-norm", "l2": "ℓ2-norm", "raw": "w/o Clip", "clip": "Clip (ours)"}}
# characters pdflatex has no text glyph for, as math (pandas' escape="latex-math" keeps $...$ as it is)
LATEX_SYMBOLS = {"↓": r"$\downarrow$", "×": r"$\times$", "ℓ": r"$\ell$", "±": r"$\pm$", "≤": r"$\leq$",
                 "<": "$<$", ">": "$>$", "−": "-", MISSING: "--"}
MARKDOWN_MARKS = {BEST: "**{}**", TIED: "*{}*"}
LATEX_MARKS = {BEST: "textbf: --rwrap;", TIED: "underline: --rwrap;"}  # Styler's LaTeX commands: \textbf{cell}


def fmt(found, kind: str, spread=None, count: int | None = None) -> str:
    """A number as shown: acc x100 with one decimal, pct x100 with " %", num with two decimals (from 1e6 in
    scientific notation), ppl (and bits per byte) with three decimals below 10, two below 1e5, else three
    significant digits (1.39e+06: a diverged perplexity stays readable); "± spread" in its number's notation and
    "(n=count)" when given."""
    if found is None:
        return MISSING

    def one(x, like):  # a spread in the notation of its number
        if kind in ("acc", "pct"):
            return f"{100 * x:.1f}"
        if kind == "ppl":  # a diverged perplexity in three digits; bits per byte (below 10) in three decimals
            return f"{x:.2e}" if abs(like) >= 1e5 else f"{x:.3f}" if abs(like) < 10 else f"{x:.2f}"
        return f"{x:.2f}" if abs(like) < 1e6 else f"{x:.2e}"

    text = one(found, found) + (f" ± {one(spread, found)}" if spread is not None else "")
    text += " %" if kind == "pct" else ""
    return text + (f" (n={count})" if count is not None else "")


def axis_label(axis: str, found) -> str:
    if axis == "ratio":
        return f"{100 * found:g} %"
    if axis == "sparsity":
        return "0 %" if found in (0, None) else (f"{100 * found:g} %" if isinstance(found, float) else str(found))
    if axis == "method":
        return METHODS.get(found, str(found))
    if axis == "layers":
        return "default" if found is None else "[" + ",".join(str(v) for v in found) + "]"
    if axis == "design":  # option names of experiments/design: <hidden>_<residual>, e.g. q0.5_M-only
        return " / ".join(f"q = {part[1:]}" if part[:1] == "q" else part for part in str(found).split("_"))
    if found in VALUES.get(axis, {}):
        return VALUES[axis][found]
    return MISSING if found is None else str(found)


def header(axis: str) -> str:
    return HEADERS.get(axis, axis.split(".")[-1])


def latex_symbols(text) -> str:
    return "".join(LATEX_SYMBOLS.get(char, char) for char in str(text))


def latex_text(text) -> str:
    """Text outside the tabular (caption, comments): pandas escapes the cells and headers it renders, not a
    caption, so the same escapes are written out here."""
    special = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "_": r"\_", "#": r"\#", "$": r"\$", "{": r"\{",
               "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
    return latex_symbols("".join(special.get(char, char) for char in str(text)))


@dataclass
class Table:
    name: str
    title: str
    frame: pd.DataFrame                # display strings: the row axes, then the value columns
    marks: pd.DataFrame                # same shape: BEST, TIED or ""
    values: pd.DataFrame               # the numbers behind the value columns (None where missing)
    n_expected: int
    n_missing: int
    axes: tuple = ()
    notes: list[str] = field(default_factory=list)    # provenance: missing runs, records used and left out
    legend: list[str] = field(default_factory=list)   # for the reader: the marks, the test, what columns mean
    records: pd.DataFrame = field(default_factory=pd.DataFrame)  # per cell the records used, and those left out
    spread: pd.DataFrame | None = None  # the standard errors (or standard deviations over seeds) behind `values`
    keys: list[tuple] = field(default_factory=list)  # per row its axis values (as the records hold them)
    formats: dict = field(default_factory=dict)  # per value column its kind of number (fmt's: acc, pct, num, ppl)
    used: list[list[str]] = field(default_factory=list)  # per row the run ids its cells are computed from

    @property
    def bold(self) -> pd.DataFrame:
        return self.marks == BEST

    @property
    def tied(self) -> pd.DataFrame:
        return self.marks == TIED

    def footer(self) -> str:
        return "\n".join([f"Missing: {self.n_missing} of {self.n_expected} runs (shown as {MISSING})."]
                         + self.notes + self.legend)

    def markdown(self) -> str:
        cells = self.frame.copy()
        for mark, pattern in MARKDOWN_MARKS.items():
            cells = cells.mask(self.marks == mark, self.frame.map(pattern.format))
        lines = "\n".join(f"- {line}" for line in self.footer().splitlines())
        return f"### {self.title}\n\n{cells.to_markdown(index=False, disable_numparse=True)}\n\n{lines}\n"

    def latex(self) -> str:
        """A booktabs table (\\usepackage{booktabs}): the title and the legend as its caption, the provenance as
        comments below it."""
        styler = self.frame.style.hide(axis="index")
        styler = styler.format(latex_symbols, escape="latex-math")
        styler = styler.format_index(latex_symbols, escape="latex-math", axis=1)
        styler = styler.apply(lambda _: self.marks.replace(LATEX_MARKS).replace("", None), axis=None)
        n = len(self.axes)
        caption = latex_text(" ".join([self.title + "."] + self.legend))
        text = styler.to_latex(hrules=True, column_format="l" * n + "r" * (self.frame.shape[1] - n),
                               environment="table", position="t", position_float="centering",
                               caption=(caption, latex_text(self.title)), label=f"tab:{self.name}")
        return text + "".join(f"% {line}\n" for line in ([f"Missing: {self.n_missing} of {self.n_expected} runs."]
                                                         + self.notes))
