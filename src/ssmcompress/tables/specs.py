"""The tables: which sweeps each is drawn from, its row axes and splits, and its columns (what each reads from a
record, its standard error, its per-document values for the paired test)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

from ssmcompress.tables import stats

# Rethinking Token Reduction for State Space Models (Zhan, Wu, Kong et al., EMNLP 2024), Sec. 5.4 "Efficiency" and
# App. A.2, Figs. 3-6: UTR on Mamba-2 at 10 / 20 / 30 % of the FLOPs removed, as stated in the text (the plots'
# other values are not given). Generation throughput speed-up over dense: batch 16, prompts of 2048 tokens, 100
# generated tokens. Peak memory change: generating 2048 tokens at batch size 96.
PAPER = {
    "generation_speedup": {"mamba2-2.7b": {0.1: 1.10, 0.2: 1.22, 0.3: 1.37},
                           "mamba2-1.3b": {0.1: 1.10, 0.2: 1.19, 0.3: 1.35}},
    "peak_memory_change": {"mamba2-2.7b": {0.1: -0.114, 0.2: -0.203, 0.3: -0.306},
                           "mamba2-1.3b": {0.1: -0.119, 0.2: -0.239, 0.3: -0.429}},
}
PAPER_METHODS = ("ours", "official")  # the paper's figures are UTR's: shown beside our UTR rows

TASKS = {"lambada_openai": "LAMBADA", "hellaswag": "HellaSwag", "piqa": "PIQA", "arc_easy": "ARC-E",
         "arc_challenge": "ARC-C", "winogrande": "WinoGrande", "shakespeare_lastword": "Lastword",
         "shakespeare_continuation": "Continuation", "mqar": "MQAR", "story_qa": "StoryQA",
         "shakespeare_ppl": "Held-out", "mqar_gen": "MQAR (gen)", "story_qa_gen": "StoryQA (gen)",
         "wikitext2": "WikiText-2", "ptb": "PTB", "c4": "C4"}
# extra metrics shown before the accuracies (smaller is better): their column suffix, and what the table's
# footnote says they are
LOWER = {"perplexity": "PPL/word", "token_perplexity": "PPL/token", "ppl": "PPL", "word_perplexity": "word PPL",
         "byte_perplexity": "byte PPL", "bits_per_byte": "bits/byte"}
MEANING = {
    "perplexity": "PPL/word: lm-eval's LAMBADA perplexity, exp(-mean over documents of the log-likelihood of the whole "
                  "target word), a word of several tokens: a model that seldom predicts the word scores in the 1e5-1e6.",
    "token_perplexity": "PPL/token: exp(-sum of the targets' log-likelihoods / their tokens), the same targets per "
                        "token (not tested: the records keep no per-document token counts).",
    "word_perplexity": "word PPL: exp(-log-likelihood of the held-out passages / their words) (loglikelihood_rolling).",
    "byte_perplexity": "byte PPL: exp(-log-likelihood / bytes) of the held-out passages.",
    "bits_per_byte": "bits/byte: -log2-likelihood / bytes of the held-out passages.",
}


@dataclass
class Column:
    header: str
    fmt: str                   # render.fmt's kinds: acc (x100, the paper's %), pct, num, ppl
    better: str | None         # higher | lower | None (no highlighting)
    get: Callable[[dict], float | None]
    stderr: Callable[[dict], float | None] = lambda row: None
    documents: Callable[[dict], list | None] = lambda row: None  # per task (doc ids, values): the paired test's
    statistic: Callable[[list], object] | None = None  # of `documents`' values: the column's number
    can_be_best: Callable[[dict], bool] = lambda row: True  # efficiency: nothing slower than dense is best
    from_key: bool = False     # read from the row's axes alone (the paper's figures): shown for missing runs too
    meaning: str | None = None  # a footnote saying what the column is


def number(found):
    return found if isinstance(found, (int, float)) and not isinstance(found, bool) and not (
        isinstance(found, float) and math.isnan(found)) else None


def _task_column(task: str, metric: str, header: str, key: str, better: str) -> Column:
    aggregate = stats.AGGREGATES.get(metric)
    one = stats.documents
    return Column(header, "acc" if better == "higher" else "ppl", better,
                  get=lambda row: number(row["headline"].get(key)),
                  stderr=lambda row: number((row["stderr"].get(task) or {}).get(metric)),
                  documents=lambda row: None if one(row["samples"], task, metric) is None
                  else [one(row["samples"], task, metric)],
                  statistic=None if aggregate is None else lambda values: aggregate(values[0]),
                  meaning=MEANING.get(metric))


def accuracy_columns(tasks: list[str], extras: dict, main: dict | None = None) -> list[Column]:
    """Perplexities first (as LAMBADA PPL in the paper), then each task's headline metric, then Avg.
    A task without a main metric (`main` given; held-out perplexity) has only its perplexity columns."""
    main = {t: "acc" for t in tasks} if main is None else main
    scored = [t for t in tasks if t in main]
    columns = [_task_column(t, m, f"{TASKS.get(t, t)} {LOWER[m]}", f"{t}/{m}", "lower")
               for t in tasks for m in extras.get(t, []) if m in LOWER]
    columns += [_task_column(t, main[t], TASKS.get(t, t), t, "higher") for t in scored]
    return columns + [average_column("Avg", scored, main)]


def average_column(header: str, tasks: list[str], main: dict) -> Column:
    """The mean of the tasks' headline metrics (`main[task]`), its standard error from theirs, and for the paired test
    the mean of their per-document aggregates."""
    per_task = [_task_column(t, main[t], TASKS.get(t, t), t, "higher") for t in tasks]

    def average(row):  # over the table's tasks: a run on fewer tasks has no comparable average
        values = [c.get(row) for c in per_task]
        return None if not values or None in values else sum(values) / len(values)

    def documents(row):
        found = [c.documents(row) for c in per_task]
        return None if not found or None in found else [task[0] for task in found]

    def statistic(values):
        return sum(stats.AGGREGATES[main[t]](v) for t, v in zip(tasks, values)) / len(tasks)

    return Column(header, "acc", "higher", average,
                  stderr=lambda row: stats.average_stderr([c.stderr(row) for c in per_task]),
                  documents=documents, statistic=statistic)


# the long-context suite (conf/benchmark/long.yaml): five tasks at each of four prompt lengths, shown per length
LONG_LENGTHS = (1024, 2048, 4096, 8192)
LONG_TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "mqar_long", "story_long")


def long_tasks(length: int) -> list[str]:
    return [f"{task}_{length}" for task in LONG_TASKS]


LONG_COLUMNS = [average_column(f"{length} tokens", long_tasks(length), dict.fromkeys(long_tasks(length), "acc"))
                for length in LONG_LENGTHS] + [
    average_column("Avg", [t for n in LONG_LENGTHS for t in long_tasks(n)],
                   {t: "acc" for n in LONG_LENGTHS for t in long_tasks(n)})]


def _measured(section: str, name: str):
    """The reduced run's number (a dense run has only the dense one's)."""
    return lambda row: number(row[section].get(f"reduced_{name}", row[section].get(f"dense_{name}")))


def _dense_default(section: str, name: str, default: float):
    return lambda row: number(row[section].get(name, default if row["method"] == "dense" else None))


def _faster(section: str):
    """Time and throughput are best only where the run beats dense (speed-up > 1)."""
    return lambda row: (number(row[section].get("speedup")) or 0.0) > 1.0


def _paper(figure: str):
    return lambda row: (PAPER[figure].get(row["model"], {}).get(row["ratio"])
                        if row["method"] in PAPER_METHODS else None)


def _peak_change(prefix: str = ""):
    return lambda row: (None if number(row["efficiency"].get(f"{prefix}peak_memory_saving")) is None
                        else -row["efficiency"][f"{prefix}peak_memory_saving"])


def _saves(prefix: str = ""):
    return lambda row: (number(row["efficiency"].get(f"{prefix}peak_memory_saving")) or 0.0) > 0


def _achieved(row):
    return number(row["flops"].get("achieved_ratio"))


# ssmcompress.metrics.efficiency.measure's fields; the speed-up is dense / reduced in the same process
EFFICIENCY_COLUMNS = [
    Column("FLOPs↓ achieved", "pct", None, _achieved),
    Column("latency ms", "num", "lower", _measured("efficiency", "latency_ms"), can_be_best=_faster("efficiency")),
    Column("tokens/s", "num", "higher", _measured("efficiency", "tokens_per_s"), can_be_best=_faster("efficiency")),
    Column("peak MiB", "num", "lower", _measured("efficiency", "peak_mib")),
    Column("activation MiB", "num", "lower", _measured("efficiency", "activation_mib")),
    Column("speed-up", "num", "higher", _dense_default("efficiency", "speedup", 1.0),
           can_be_best=_faster("efficiency")),
    # the speed-up over the FLOPs-ideal 1 / (1 - achieved ratio): 100 % = time falls exactly as FLOPs do
    Column("of ideal", "pct", "higher", lambda row: number(
        row["efficiency"]["speedup"] * (1 - row["flops"]["achieved_ratio"]) if "speedup" in row["efficiency"]
        else None), can_be_best=_faster("efficiency")),
    # the speed-up over the ceiling's (the cut alone at the same counts, timed beside it): what the method keeps
    Column("of ceiling", "pct", "higher", lambda row: number(row["efficiency"].get("of_ceiling")),
           can_be_best=_faster("efficiency")),
    Column("overhead", "pct", "lower", _dense_default("efficiency", "reduction_overhead", 0.0)),  # own time / dense
    Column("peak memory saving", "pct", "higher", _dense_default("efficiency", "peak_memory_saving", 0.0),
           can_be_best=_saves()),
]

# ssmcompress.metrics.generation.measure's fields
GENERATION_COLUMNS = [
    Column("FLOPs↓ achieved", "pct", None, _achieved),
    Column("prefill ms", "num", "lower", _measured("generation_speed", "prefill_ms"), can_be_best=_faster("generation_speed")),
    Column("generation ms", "num", "lower", _measured("generation_speed", "generation_ms"),
           can_be_best=_faster("generation_speed")),
    Column("decode ms/token", "num", None, _measured("generation_speed", "decode_ms_per_token")),
    Column("tokens/s", "num", "higher", _measured("generation_speed", "tokens_per_s"), can_be_best=_faster("generation_speed")),
    Column("speed-up", "num", "higher", _dense_default("generation_speed", "speedup", 1.0),
           can_be_best=_faster("generation_speed")),
    Column("paper speed-up", "num", None, _paper("generation_speedup"), from_key=True),
    Column("prefill speed-up", "num", "higher", _dense_default("generation_speed", "prefill_speedup", 1.0),
           can_be_best=lambda row: (number(row["generation_speed"].get("prefill_speedup")) or 0.0) > 1.0),
    # the most a reduction can give: dense generation / (ceiling prefill + dense decoding) on a pure SSM, / the
    # ceiling's generation on a hybrid (its decoding runs over a shorter KV cache too)
    Column("bound", "num", None, lambda row: number(row["generation_speed"].get("bound"))),
    Column("of bound", "pct", "higher", lambda row: number(row["generation_speed"].get("of_bound")),
           can_be_best=_faster("generation_speed")),
    Column("peak MiB", "num", "lower", _measured("generation_speed", "peak_mib")),
    # the attention layers' keys and values after the prefill (hybrids); expected: the share of the attention
    # layers' tokens the schedule removes
    Column("KV cache MiB", "num", "lower", _measured("generation_speed", "kv_cache_mib")),
    Column("KV saved", "pct", None, lambda row: number(row["generation_speed"].get("kv_cache_saving"))),
    Column("KV saved, expected", "pct", None,
           lambda row: number(row["generation_speed"].get("expected_kv_cache_saving"))),
]

# "sliced": the same forwards with every mixer run on `mixer_rows` rows at a time (ssmcompress.mixer_slices)
MEMORY_COLUMNS = [
    Column("FLOPs↓ achieved", "pct", None, _achieved),
    Column("dense peak MiB", "num", None, lambda row: number(row["efficiency"].get("dense_peak_mib"))),
    Column("peak MiB", "num", "lower", _measured("efficiency", "peak_mib")),
    Column("peak change", "pct", "lower", _peak_change(), can_be_best=_saves()),
    Column("paper peak change", "pct", None, _paper("peak_memory_change"), from_key=True),
    Column("activation MiB", "num", "lower", _measured("efficiency", "activation_mib")),
    Column("sliced dense peak MiB", "num", None, lambda row: number(row["efficiency"].get("sliced_dense_peak_mib"))),
    Column("sliced peak MiB", "num", "lower", lambda row: number(row["efficiency"].get(
        "sliced_reduced_peak_mib", row["efficiency"].get("sliced_dense_peak_mib")))),
    Column("sliced peak change", "pct", "lower", _peak_change("sliced_"), can_be_best=_saves("sliced_")),
]


@dataclass
class Spec:
    name: str
    title: str
    experiments: tuple                 # conf/experiment/<name>.yaml: the sweeps whose grid gives the expected rows
    kind: str = "lm_eval"              # the benchmark kind of its records: lm_eval | efficiency | generation
    axes: tuple | None = None          # row axes, outer to inner (None: model, ratio, then what the sweeps vary)
    block: int = 2                     # leading axes forming a block, for best-per-column highlighting
    split: tuple = ("benchmark", "protocol")
    numbers: dict = field(default_factory=dict)  # the paper's numbering: {mamba_version: "Table 1"} or {None: ...}
    family: str | None = "mamba"       # the model family of its records (mamba-ssm or hf: transformers; None: any)
    columns: list[Column] | None = None  # None: the benchmark's accuracy columns
    shapes: tuple = ()                 # only records measured at these shapes (row "shape"; empty: any)
    other_shapes: tuple = ()           # shapes whose records are another table's (the memory protocol's batch 96)
    captured: bool = False             # only records whose forwards were CUDA graph replays (efficiency.forward_path)
    optional_axes: tuple = ()          # row axes shown only where the table's rows differ in them
    generations: tuple = ()            # only records of these Mamba generations (model_info.mamba_version; empty: any)
    notes: tuple = ()                  # lines the table's footer always has
    closed: tuple = ()                 # axes whose values are its sweeps' alone ("benchmark": no other table takes
                                       # those records; "model": no other model's records enter it)

    @property
    def section(self) -> str:
        """The record section its rows are read from."""
        return {"lm_eval": "headline", "generation": "generation_speed"}.get(self.kind, self.kind)


EFFICIENCY = ("Single measurements (medians of the timed repeats, dense and reduced interleaved in one process): "
              "best per block in bold, no test; nothing slower than dense (speed-up <= 1) is marked.",)
SPECS = [
    Spec("main", "Main accuracy", ("main",), split=("benchmark", "protocol", "mamba_version"),
         numbers={2: "Table 1", 1: "Table 2"}, generations=(2, 1)),  # Mamba-3 has its own table
    Spec("importance", "Importance metric", ("ablation_importance",), numbers={None: "Table 3"}),
    Spec("location", "Reduction location", ("ablation_location", "ablation_location_hub"), numbers={None: "Table 4"}),
    Spec("design", "Hidden-state / residual design", ("ablation_design",), numbers={None: "Table 5"}),
    Spec("share", "Prune vs merge share", ("ablation_share",)),
    Spec("efficiency", "Efficiency", ("efficiency", "hybrid_efficiency"), kind="efficiency", family=None, split=("device", "shape"),
         axes=("model", "ratio", "method", "schedule"), optional_axes=("schedule",), columns=EFFICIENCY_COLUMNS,
         other_shapes=("batch 96 x 2048",), notes=EFFICIENCY),
    Spec("efficiency_graph", "Efficiency, CUDA graph replays", ("efficiency_sizes", "hybrid_efficiency"),
         kind="efficiency", family=None, split=("device", "shape"), axes=("model", "ratio", "method", "schedule"),
         optional_axes=("schedule",), columns=EFFICIENCY_COLUMNS, captured=True,
         notes=EFFICIENCY + ("Every forward (dense, reduced, ceiling) timed as replays of one CUDA graph capture "
                             "(benchmark.measure.capture): the GPU's work without launch or host costs; overhead: "
                             "the reduction's own time in eager calls, as a share of the eager dense forward.",)),
    Spec("generation", "Generation speed", ("generation", "hybrid_generation"), kind="generation", family=None, split=("device", "shape"),
         axes=("model", "ratio", "method", "schedule"), optional_axes=("schedule",), columns=GENERATION_COLUMNS,
         notes=EFFICIENCY + ("paper speed-up: the paper's generation throughput speed-up for UTR (Rethinking Token "
                             "Reduction for SSMs, EMNLP 2024, Sec. 5.4: batch 16, prompt 2048, 100 new tokens); "
                             "bound: the most the reduction can give: dense generation / (ceiling prefill + dense "
                             "decoding) on a pure SSM, dense generation / the ceiling's generation on a hybrid (its "
                             "decoding runs over a shorter KV cache too). KV saved, expected: the share of the "
                             "attention layers' tokens the schedule removes.",)),
    Spec("memory", "Peak memory", ("memory",), kind="efficiency", family=None, split=("device", "shape"),
         axes=("model", "ratio", "method", "schedule"), optional_axes=("schedule",), columns=MEMORY_COLUMNS,
         shapes=("batch 96 x 2048",),  # the efficiency table's other_shapes
         notes=("Peak memory of one forward (torch.cuda.max_memory_allocated), reduced against dense in the same "
                "process; change = reduced / dense - 1. paper peak change: the paper's for UTR (Rethinking Token "
                "Reduction for SSMs, EMNLP 2024, Sec. 5.4: batch 96, 2048 tokens). sliced: the same forwards with "
                "every block's mixer run on benchmark.measure.mixer_rows rows at a time (ssmcompress.mixer_slices) and, "
                "where the record's efficiency.reduction_rows is set, each reduction layer's method too "
                "(Reducer.row_slices; 16 and 16 in conf/experiment/memory.yaml), "
                "so that the full-length blocks before the first reduction layer no longer set the peak. Best per "
                "block in bold, no test.",)),
    Spec("schedule", "Smooth vs chunk-multiple token counts", ("schedule",)),
    Spec("positional", "Positional baselines", ("positional",), split=("benchmark", "protocol", "mamba_version"),
         generations=(2, 1)),
    Spec("hybrid", "Token reduction on an SSM-attention hybrid", ("hybrid",), family="hf",
         axes=("model", "reduce_at", "ratio", "method"), block=3,
         notes=("reduce_at: ssm reduces at layers with an SSM mixer only, all at the attention layers too (docs/reduction.md: "
                "Hybrids).",)),
    Spec("mamba3", "Token reduction on Mamba-3", ("mamba3", "mamba3_trapezoid", "mamba3_rotation"),
         axes=("model", "trapezoid", "rotation", "ratio", "method"), block=4, generations=(3,),
         notes=("trapezoid: kept takes a kept token's trapezoid neighbour to be the previous token it receives, none "
                "gives a token whose original predecessor was removed the step of the token alone. rotation: kept "
                "advances a kept token's rotation by its own angle step, positions by its step times the original "
                "positions since the previous kept token, sizes by its step times the tokens merged into it "
                "(docs/hosts.md: Mamba-3).",)),
    Spec("long", "Long-context accuracy", ("long", "long_filter"), columns=LONG_COLUMNS, closed=("benchmark",),
         notes=("Per prompt length, the mean accuracy of its five tasks (needle, multi-key and multi-value retrieval, "
                "long MQAR, long story QA; four choices each, chance 25 %); Avg over all twenty. longmamba removes no "
                "token (0 % of the FLOPs; docs/suite.md: Long context).",)),
    Spec("long_speed", "Long-context speed, CUDA graph replays", ("long_efficiency",), kind="efficiency", family=None,
         split=("device", "shape"), axes=("model", "ratio", "method"), columns=EFFICIENCY_COLUMNS, captured=True,
         shapes=tuple(f"batch 1 x {length}" for length in LONG_LENGTHS), closed=("model",),
         notes=EFFICIENCY + ("The speed-ups behind the long-context accuracies: the same methods and budgets at the "
                             "suite's lengths, batch 1, every forward timed as replays of one CUDA graph capture.",)),
    Spec("pruning", "Weight pruning", ("pruning",), axes=("model", "sparsity", "pruner")),
    Spec("pruning_hf", "Weight pruning (transformer)", ("pruning_hf",), axes=("model", "sparsity", "pruner"),
         family="hf"),
    Spec("joint", "Weight pruning and token reduction", ("pruning_joint",),
         axes=("model", "pruner", "sparsity", "ratio", "method"), block=4,
         notes=("Held-out perplexity scores every token of a passage, so the exact protocol protects every position "
                "and token reduction leaves it as the pruned model's.",)),
]
