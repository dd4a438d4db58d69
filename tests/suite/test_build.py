"""The offline suite: deterministic, reproducible from the PyPI sdist, well-formed, loadable by lm-eval."""
import json
import random

from ssmcompress.suite import build, corpus, synthetic


def test_rebuilding_reproduces_the_bundled_suite(tmp_path):
    counts = build.build(tmp_path)
    assert counts == build.SIZES
    for task in build.SIZES:
        assert (tmp_path / f"{task}.jsonl").read_text() == (build.TASK_DIR / f"{task}.jsonl").read_text(), task


def test_the_full_variant_is_the_same_tasks_with_more_documents(tmp_path):
    """offline_full: rebuilt byte for byte; every document of the small variant is in it; lm-eval loads its tasks
    (same names, same YAML through `include`) with its own data."""
    from ssmcompress.evaluation import harness

    full = build.TASKS / "offline_full"
    assert build.build(tmp_path, build.VARIANTS["offline_full"]) == build.VARIANTS["offline_full"]
    build.variant_tasks(tmp_path, "offline_full")
    for task in build.SIZES:
        assert (tmp_path / f"{task}.jsonl").read_text() == (full / f"{task}.jsonl").read_text(), task
        assert (tmp_path / f"{task}.yaml").read_text() == (full / f"{task}.yaml").read_text(), task
        small = {json.dumps(d, sort_keys=True) for d in load(task)}
        large = {json.dumps(json.loads(line), sort_keys=True)
                 for line in (full / f"{task}.jsonl").read_text().splitlines()}
        assert small < large
    loaded = harness.task_manager(str(full)).load(["mqar", "shakespeare_lastword"])["tasks"]
    assert {name: len(task.dataset["test"]) for name, task in loaded.items()} == {"mqar": 500,
                                                                                "shakespeare_lastword": 449}


def test_heldout_plays_are_not_in_training():
    train, heldout = corpus.split_plays(corpus.load_plays())
    assert set(heldout) == set(corpus.HELDOUT_PLAYS) and not set(train) & set(heldout)
    assert len(train) >= 30


def load(task):
    return [json.loads(line) for line in (build.TASK_DIR / f"{task}.jsonl").read_text().splitlines()]


def test_lastword_targets_occur_earlier_in_their_passage():
    for doc in load("shakespeare_lastword"):
        word = doc["target"].strip()
        assert doc["target"] == " " + word and word in doc["context"]
        assert doc["play"] in corpus.HELDOUT_PLAYS and 0 < doc["chance"] < 1


def test_multiple_choice_docs_are_well_formed():
    for task in ("shakespeare_continuation", "mqar", "story_qa"):
        for doc in load(task):
            assert len(doc["choices"]) == 4 == len(set(doc["choices"])) and 0 <= doc["label"] < 4, task


def test_synthetic_answers_are_recoverable_from_the_context():
    rng = random.Random(0)
    for _ in range(50):
        doc = synthetic.mqar(rng)
        answer = doc["choices"][doc["label"]]
        assert f"{doc['key']} {answer}," in doc["context"] or f"{doc['key']} {answer}." in doc["context"]
        assert all(f" {c}" in doc["context"] for c in doc["choices"])  # every choice was seen: recall, not guess
        story = synthetic.story(rng)
        place = story["choices"][story["label"]]
        sentences = story["context"].split("\n")[1].split(". ")  # the story line, between "Story:" and the question
        last_move = [s for s in sentences if s.startswith(story["person"] + " ")][-1]
        assert last_move.endswith(place)


def test_training_documents_mark_only_answers():
    rng = random.Random(1)
    for progress in (0.0, 1.0):
        for make in (synthetic.training_mqar, synthetic.training_story):
            pieces = make(rng, progress)
            answers = [text for text, is_answer in pieces if is_answer]
            assert answers and all(text.startswith(" ") and len(text.split()) == 1 for text in answers)


def test_tasks_load_through_lm_eval_task_manager():
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(build.TASK_DIR), include_defaults=False)
    tasks = manager.load_task_or_group(list(build.SIZES))
    for name, task in tasks.items():
        assert len(list(task.test_docs())) == build.SIZES[name]
