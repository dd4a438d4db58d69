"""The front door: the documentation builds strictly, its result pages are the committed tables' (never stale), the
README stays short, license and citation agree, and a pinned version has one home."""
import base64
import importlib.util
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from conftest import compose_config
from ssmcompress import cli, runner
from ssmcompress.config import REPO
from ssmcompress.tables import docs

BINARY = (".safetensors", ".bin", ".png", ".pdf", ".gz", ".whl")


def tracked_text_files() -> list:
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.splitlines()
    return [REPO / name for name in listed if not name.endswith(BINARY) and (REPO / name).is_file()]


def test_the_documentation_builds_strictly(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "site" / "index.html").is_file()


def test_every_page_is_in_the_navigation():
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text())

    def pages(nav):
        for entry in nav:
            for value in entry.values():
                yield from (pages(value) if isinstance(value, list) else [value])

    listed = set(pages(config["nav"]))
    written = {p.relative_to(REPO / "docs").as_posix() for p in (REPO / "docs").glob("*.md")}
    assert listed == written


def test_the_pages_that_quote_results_are_rendered_from_the_committed_tables():
    # a page differing from its template's rendering was edited by hand or not regenerated after `make tables`
    for name, text in docs.render().items():
        target = REPO / "README.md" if name == "README.md" else REPO / "docs" / name
        assert target.read_text() == text, f"{target} is stale: run `make docs`"


def test_the_readme_is_a_front_door():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 160
    for needed in ("make run", "make test", "docs/", "CITATION.cff", "LICENSE"):
        assert needed in readme, needed


def test_license_and_citation_are_there_and_agree():
    citation = yaml.safe_load((REPO / "CITATION.cff").read_text())
    assert citation["cff-version"] == "1.2.0" and citation["license"] == "Apache-2.0"
    titles = {reference["title"] for reference in citation["references"]}
    assert titles == {"Rethinking Token Reduction for State Space Models",
                      "Pruning Foundation Models for High Accuracy without Retraining"}
    assert "Apache License" in (REPO / "LICENSE").read_text()
    assert 'license = "Apache-2.0"' in (REPO / "pyproject.toml").read_text()


# Words of the place the code was written in, which mean nothing to a reader of the code or its documentation.
# Encoded so that this file does not contain them itself.
ELSEWHERE = base64.b64decode(
    "YGRldmljZWAgdG9vbApkZXZpY2UgdG9vbApsZW50IGdwdQpsZW50IGgxMDAKbGVudCBoMjAwCnNoYXJlZC9yZWZlcmVuY2UKc2hhcmVkL2Rlc2ln"
    "bgouLi9zaGFyZWQKLmxpYnJhcnkvCnN1YmFnZW50CndvcmtwbGFjZQppc3N1ZXMgc2hvdwpidWRnZXRfbGVmdF9zCmRldmljZSBidWRnZXQ="
).decode().splitlines()


def test_no_words_of_elsewhere_in_code_docs_configs_or_notebooks():
    found = []
    for path in tracked_text_files():
        try:
            text = path.read_text().lower()
        except UnicodeDecodeError:
            continue
        found += [f"{path.relative_to(REPO)}: {word!r}" for word in ELSEWHERE if word in text]
    assert not found, found


def test_mamba_ssms_pin_has_one_home():
    pin = re.search(r'"(mamba-ssm==[^"]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    for path in tracked_text_files():
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        for other in re.findall(r"mamba-ssm==[\w.]+", text):
            assert other == pin, f"{path.relative_to(REPO)} pins {other}, pyproject.toml {pin}"


# ---- every command the README and the documentation show is one that works --------------------------------------

DOCUMENTED = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"```(\w*)\n(.*?)```", re.S)
SPAN = re.compile(r"`((?:python |make |ssmcompress-[\w-]+ )[^`]*)`")
# commands of other tools, shown as they are (their own documentation covers them)
# <m>, DIR, [overrides], [...]: what the reader fills in
PLACEHOLDER = re.compile(r"<[\w -]+>|=[A-Z]+$|^\[.*\]$|\.\.\.")
# a documented run, made quick: one document per task, and no timing (FLOPs, latency and memory have their tests)
QUICK = {"limit": 1, "measure.enabled": "false"}
# a benchmark whose every task is slow on a CPU runs two of them (its whole task list is still composed and checked)
QUICK_TASKS = {"long": "[niah_single_1024,niah_multikey_2048]"}
FOREIGN = ("pip", "git", "accelerate", "cd", "export", "mkdocs", "pytest", "bash", "sbatch", "wandb", "huggingface-cli", "hf",
           "lm_eval", "nvidia-smi", "source", "uv", "conda", "jupyter", "python3 -m venv", "python -m venv",
           "python -m pytest", "python -m mkdocs", "ls", "cat", "tail", "du", "TRITON_INTERPRET=1", "CUDA_VISIBLE_DEVICES")


def documented_commands() -> list[tuple[str, str]]:
    """(page, command) for each shell line of a bash block and each inline `python ...`, `make ...`,
    `ssmcompress-...` span (continuations joined, comments and prompts dropped)."""
    found = []
    for page in DOCUMENTED:
        text = page.read_text()
        for language, body in FENCE.findall(text):
            if language not in ("bash", "sh", "shell", "console"):
                continue
            for line in body.replace("\\\n", " ").splitlines():
                line = re.sub(r"(^|\s)#.*$", "", line.strip().removeprefix("$ ")).strip()
                if line:
                    found.append((page.name, line))
        for span in SPAN.findall(FENCE.sub("", text)):
            found.append((page.name, span))
    return found


def sweep_variants(arguments: list[str]) -> list[list[str]]:
    """A multirun's overrides as single runs: the first value of every sweep, then each other value in turn."""
    keys, choices = [], []
    for argument in arguments:
        key, _, value = argument.partition("=")
        keys.append(key)
        choices.append(re.split(r",(?![^\[]*\])", value) if value else [None])  # commas outside [..] sweep

    def single(key, value):
        return key if value is None else f"{key}={value}"

    firsts = [single(key, values[0]) for key, values in zip(keys, choices)]
    variants = [firsts]
    for i, (key, values) in enumerate(zip(keys, choices)):
        variants += [firsts[:i] + [single(key, value)] + firsts[i + 1:] for value in values[1:]]
    return variants


def check_run_command(arguments: list[str], scratch: Path) -> None:
    """Compose each run of a `python run.py` command (an unknown key, group or value fails). Where its model is on
    this machine, run the command's first run as the main job does, on two documents per task and into scratch
    (a sweep's committed store stays as it is); a hub checkpoint, a GPU setting or a placeholder is composed and,
    where that needs nothing absent here, checked."""
    given = [a for a in arguments if a not in ("-m", "--multirun") and not PLACEHOLDER.search(a)
             and not re.search(r"^<|>$", a)]
    complete = len(given) == len(arguments) - arguments.count("-m") - arguments.count("--multirun")
    assert not cli.unknown_options(given), cli.unknown_options(given)
    variants = [[re.sub(r"=/tmp/", f"={scratch}/", o) for o in overrides] for overrides in sweep_variants(given)]
    for overrides in variants:
        compose_config(overrides)
    cfg = compose_config(variants[0])
    if not complete or str(cfg.model.device).startswith("cuda") or not Path(str(cfg.model.path)).exists():
        return
    quick = [f"results_dir={scratch}/results", "logger=none", "skip_existing=false"]
    quick += [f"benchmark.{key}={value}" for key, value in QUICK.items() if key.split(".")[0] in cfg.benchmark]
    if cfg.benchmark.name in QUICK_TASKS:
        runner.validate(cfg)  # the whole benchmark: every task known, its data present
        quick.append(f"benchmark.tasks={QUICK_TASKS[cfg.benchmark.name]}")
    record = runner.run(compose_config(variants[0] + quick), run_dir=scratch / "run")
    assert record["metrics"]


def check_lm_eval_command(arguments: list[str], scratch: Path) -> None:
    """lm-eval's command line with our model, verbatim on two documents per task (lm-eval's default device is
    cuda:0, which a machine without CUDA answers as lm-eval's own backends do)."""
    script = Path(sys.executable).parent / "ssmcompress-lm-eval"
    result = subprocess.run([str(script), *arguments, "--limit", "2", "--output_path", str(scratch / "lm-eval")],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def check_command(command: str, scratch: Path) -> None:
    words = [w.removeprefix(".venv/bin/") for w in shlex.split(command)]
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # environment assignments
        words = words[1:]
    if words[:2] == ["python", "run.py"] or words[:1] == ["ssmcompress-run"]:
        check_run_command(words[2:] if words[0] == "python" else words[1:], scratch)
    elif words[:1] == ["ssmcompress-lm-eval"] and not PLACEHOLDER.search(command):
        check_lm_eval_command(words[1:], scratch)
    elif words[0] == "make":
        targets = [w for w in words[1:] if "=" not in w and not w.startswith("-")]
        result = subprocess.run(["make", "-n", *targets], cwd=REPO, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
    elif words[:2] == ["python", "-m"]:
        assert importlib.util.find_spec(words[2]) is not None, words[2]
    elif words[0] == "python":
        assert (REPO / words[1]).is_file(), words[1]
    elif words[0].startswith("ssmcompress-"):
        scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
        assert words[0] in scripts, words[0]
    else:
        assert shlex.join(words).startswith(FOREIGN), "a command of an unknown tool"


@pytest.mark.parametrize("command", sorted({command for _, command in documented_commands()}),
                         ids=lambda command: command[:60])
def test_every_documented_command_works(command, tmp_path, single_thread):
    for n, part in enumerate(re.split(r"\s*(?:&&|;)\s*", command)):
        check_command(part, tmp_path / str(n))


# ---- the lookups a template's numbers come from ------------------------------------------------------------------

TABLE = """### Example

| model | FLOPs↓ | method | Avg |
|:--|:--|:--|:--|
| m | 0 % | dense | 60.0 ± 1.0 |
|   | 30 % | ToMe | *50.5 ± 1.1* |
|   |      | UTR (ours) | **52.0 ± 1.2** |

Missing: 1 of 4 runs
"""


def test_a_lookup_reads_one_row_by_its_labels(tmp_path):
    (tmp_path / "example.md").write_text(TABLE)
    lookup = docs.Lookup(tmp_path, tmp_path)
    assert lookup.cell("example", "Avg", flops="30 %", method="ToMe") == "50.5 ± 1.1"
    assert lookup.mean("example", "Avg", model="m", method="UTR (ours)") == "52.0"
    assert lookup.marked("example", "Avg", flops="30 %", method="UTR (ours)") == "**52.0**"
    assert lookup.span("example", "Avg", flops="30 %") == "50.5–52.0"
    assert lookup.values("example", "Avg") == [60.0, 50.5, 52.0]
    assert lookup.runs("example") == "3 of 4"
    assert lookup.has("example", method="EViT") is False
    assert lookup.subtable("example", ["method", "Avg"], flops="30 %").splitlines()[2:] == \
        ["| ToMe | *50.5 ± 1.1* |", "| UTR (ours) | **52.0 ± 1.2** |"]


@pytest.mark.parametrize("lookup,message", [
    (lambda l: l.cell("example", "Avg", flops="30 %"), "2 rows match"),
    (lambda l: l.cell("example", "Avg", method="EViT"), "no row matches"),
    (lambda l: l.cell("example", "MQAR", method="ToMe"), "no column 'MQAR'"),
    (lambda l: l.cell("missing", "Avg"), "no table 'missing'"),
    (lambda l: l.jsonl("log.jsonl", "step", stage=3), "no line matches"),
    (lambda l: l.jsonl("log.jsonl", "step"), "2 lines match"),
])
def test_a_lookup_that_is_not_one_value_stops_the_rendering(tmp_path, lookup, message):
    (tmp_path / "example.md").write_text(TABLE)
    (tmp_path / "log.jsonl").write_text('{"step": 1, "stage": 1}\n{"step": 2, "stage": 2}\n')
    with pytest.raises(docs.TableLookupError, match=message):
        lookup(docs.Lookup(tmp_path, tmp_path))


def test_jsonl_lookups_match_aggregate_and_pick(tmp_path):
    (tmp_path / "log.jsonl").write_text('{"step": 1, "stage": 1, "loss": {"lm": 2.0}}\n'
                                        '{"step": 2, "stage": 1, "loss": {"lm": 1.0}}\n'
                                        '{"step": 3, "stage": 2, "loss": {"lm": 0.5}}\n')
    lookup = docs.Lookup(tmp_path, tmp_path)
    assert lookup.jsonl("log.jsonl", "step", agg="max", stage=1) == 2
    assert lookup.jsonl("log.jsonl", "loss.lm", agg="mean", fmt="{:.2f}", stage=1) == "1.50"
    assert lookup.jsonl("log.jsonl", "step", pick="last", stage=[1, 2]) == 3
    assert lookup.jsonl("log.jsonl", None, agg="count", loss__lm=0.5) == 1
