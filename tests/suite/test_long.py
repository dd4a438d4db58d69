"""The long-context suite: rebuilt byte for byte, every document at its length, its answer in its text, loadable by
lm-eval, evaluated in one window whatever the model's."""
import json
import re

import pytest

from ssmcompress.suite import long, synthetic

TASKS = [long.task_name(kind, length) for kind in long.KINDS for length in long.LENGTHS]


def docs(task: str) -> list[dict]:
    lines = long.haystack()
    rows = [json.loads(line) for line in (long.TASK_DIR / f"{task}.jsonl").read_text().splitlines()]
    for row in rows:
        row["context"] = long.expand(row["segments"], lines) + row["question"]
    return rows


def test_rebuilding_reproduces_the_bundled_long_suite(tmp_path):
    assert long.build(tmp_path) == {task: long.DOCS for task in TASKS}
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == sorted(p.name for p in long.TASK_DIR.iterdir() if p.suffix in (".json", ".jsonl", ".yaml"))
    for name in written:
        assert (tmp_path / name).read_bytes() == (long.TASK_DIR / name).read_bytes(), name


@pytest.fixture(scope="module")
def tokenizer():
    from ssmcompress import models
    from ssmcompress.config import ASSETS

    return models.load_tokenizer(str(ASSETS / "models" / "mamba2-tiny"))


@pytest.mark.parametrize("task", TASKS)
def test_every_document_fits_its_length_and_fills_most_of_it(task, tokenizer):
    for doc in docs(task):
        tokens = len(tokenizer(doc["context"], add_special_tokens=False).input_ids)
        longest = max(len(tokenizer(" " + c, add_special_tokens=False).input_ids) for c in doc["choices"])
        assert tokens + longest == doc["tokens"] <= doc["length"], task
        assert doc["tokens"] >= long.MIN_FILL * doc["length"], task
        assert len(doc["choices"]) == 4 == len(set(doc["choices"])) and 0 <= doc["label"] < 4, task


def test_the_answer_is_in_the_text_and_only_the_answer_answers():
    for length in long.LENGTHS:
        for doc in docs(long.task_name("niah_single", length)):
            answer = doc["choices"][doc["label"]]
            assert f"The magic number for {doc['key']} is {answer}." in doc["context"]
            assert all(f"is {c}." not in doc["context"] for c in doc["choices"] if c != answer)
        for doc in docs(long.task_name("niah_multikey", length)):
            needles = dict(re.findall(r"The magic number for (\w+) is (\d+)\.", doc["context"]))
            assert len(needles) == 4 and needles[doc["key"]] == doc["choices"][doc["label"]]
            assert sorted(needles.values()) == sorted(doc["choices"])  # every wrong choice is another key's
        for doc in docs(long.task_name("niah_multivalue", length)):
            needles = re.findall(r"The magic number for (\w+) is (\d+)\.", doc["context"])
            assert ", ".join(v for k, v in needles if k == doc["key"]) == doc["choices"][doc["label"]]
            assert len(needles) == 8
        for doc in docs(long.task_name("mqar_long", length)):
            memory = dict(re.findall(r"(?:^|\n)(?:Remember: )?(\w+) (\d+)\.\n", doc["context"]))
            assert len(memory) == doc["n_pairs"] == long.PAIRS[length]
            assert memory[doc["key"]] == doc["choices"][doc["label"]] and doc["context"].endswith(" " + doc["key"])
            # every choice was seen among the pairs, none in the recall list: elimination from it answers nothing
            recalled = re.findall(r"(\w+) (\d+)\.", doc["question"])
            assert set(doc["choices"]) <= set(memory.values())
            assert not set(doc["choices"]) & {value for _, value in recalled} and recalled
        for doc in docs(long.task_name("story_long", length)):
            moves = re.findall(rf"{doc['person']} (?:{'|'.join(synthetic.MOVES)}) (\w+)\.", doc["context"])
            assert moves[-1] == doc["choices"][doc["label"]]


def test_the_offline_mqar_is_answered_by_elimination_and_unrecalled_choices_are_not():
    """The offline suite's MQAR recalls every pair but the scored one, whose value is then the one choice the recall
    list lacks (a shortcut the docs state); with `unrecalled` no choice is in the recall list."""
    import random

    for unrecalled in (False, True):
        rng, answered = random.Random(0), 0
        for _ in range(200):
            doc = synthetic.mqar(rng, n_pairs=8, n_queries=5 if unrecalled else 8, unrecalled=unrecalled)
            recall = doc["context"].split("\n", 1)[1]
            held = {value for _, value in re.findall(r"(\w+) (\d+)\.", recall)}
            missing = [i for i, choice in enumerate(doc["choices"]) if choice not in held]
            answered += missing == [doc["label"]]
            if unrecalled:
                assert missing == [0, 1, 2, 3]
        # all but the documents whose answer's value another recalled pair shares
        assert answered == 0 if unrecalled else answered >= 180
    with pytest.raises(ValueError, match="need 3 pairs outside"):
        synthetic.mqar(random.Random(0), n_pairs=8, n_queries=6, unrecalled=True)


def test_single_needles_sweep_the_depths_from_start_to_end():
    depths = [doc["depths"][0] for doc in docs("niah_single_4096")]
    assert depths[0] == 0 and depths[-1] == 1 and depths == sorted(depths)
    first, last = docs("niah_single_4096")[0], docs("niah_single_4096")[-1]
    assert first["context"].startswith("The magic number for")
    assert last["context"].split("\nQuestion:")[0].rstrip().endswith(".")  # the needle closes the haystack


def test_lm_eval_loads_the_tasks_with_their_text():
    from ssmcompress.evaluation import harness

    loaded = harness.task_manager(str(long.TASK_DIR)).load(["niah_multikey_8192", "story_long_1024"])["tasks"]
    for name, task in loaded.items():
        rows = list(task.dataset["test"])
        assert len(rows) == long.DOCS and rows[0]["context"] == docs(name)[0]["context"]


def test_the_long_benchmark_evaluates_every_document_whole(monkeypatch, tmp_path):
    """Its window (benchmark.max_length) replaces the model's shorter one: nothing is cut from the left."""
    from conftest import compose_config
    from ssmcompress import runner
    from ssmcompress.evaluation import harness

    seen = {}
    real = harness.evaluate

    def spy(*args, **kwargs):
        seen["max_length"] = kwargs["max_length"]
        return real(*args, **kwargs)

    monkeypatch.setattr(harness, "evaluate", spy)
    cfg = compose_config(["benchmark=long", "method=ours", "ratio=0.3", "benchmark.tasks=[niah_single_8192]",
                          "benchmark.limit=1", "benchmark.measure.enabled=false", "logger=none",
                          f"results_dir={tmp_path}"])
    assert cfg.model.max_length < 8192
    record = runner.run(cfg, run_dir=tmp_path / "run")
    assert seen["max_length"] == 8192 and set(record["metrics"]) == {"niah_single_8192"}
