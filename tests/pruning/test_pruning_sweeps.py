"""The pruning sweeps (conf/experiment/pruning*.yaml): every swept value composes and validates on the bundled models,
so a bad value fails here and not hours into a sweep; both tables know their sweeps."""
import pytest
from hydra import compose, initialize_config_dir

from ssmcompress import config as config_lib
from ssmcompress import runner, tables
from ssmcompress.config import CONF_DIR
from pruning_fixtures import one_thread  # noqa: F401


jobs = tables.sweep_jobs  # the override list of each job of `python run.py -m +experiment=<name>`


def each_value_once(expanded: list[list[str]]) -> list[list[str]]:
    """The first job, and for every other value the first job that has it."""
    chosen, seen = [], set()
    for job in expanded:
        if not set(job) <= seen:
            chosen.append(job)
            seen |= set(job)
    return chosen


@pytest.mark.parametrize("name", ["pruning", "pruning_joint", "pruning_hf"])
def test_every_swept_value_composes_and_validates(name):
    expanded = jobs(name)
    assert {o.split("=", 1)[1] for job in expanded for o in job if o.startswith("pruner=")} == \
        {"none", "magnitude", "wanda", "sparsegpt", "multi"}
    config_lib.register_resolvers()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        for job in each_value_once(expanded):
            cfg = compose("config", overrides=[f"+experiment={name}", *job, "model.random_init=true"])
            assert cfg.skip_existing is True and cfg.tag == name and cfg.benchmark.name == "pruning"
            assert cfg.results_dir == "results"  # a sweep behind the tables writes the committed store
            runner.validate(cfg)


def test_the_tables_read_these_sweeps():
    assert {"pruning", "pruning_joint", "pruning_hf"} <= {name for spec in tables.SPECS for name in spec.experiments}
    assert {spec.family for spec in tables.SPECS if "pruning_hf" in spec.experiments} == {"hf"}
    assert tables.load_experiment("pruning_hf").values("sparsity") == [0.5, 0.6, 0.7, "2:4", "4:8"]
    joint = tables.load_experiment("pruning_joint")
    assert joint.values("sparsity") == [0.5, "2:4", "4:8"] and joint.values("method") == ["dense", "ours"]
