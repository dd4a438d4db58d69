"""Sweeps (experiments/): every swept value composes and validates; SLURM launcher configs; an interrupted sweep
resumes with nothing lost or duplicated; the submitit path runs (local executor) and skips finished runs."""
import json
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ssmcompress import config as config_lib
from ssmcompress import runner, tables, tracking
from ssmcompress.config import CONF_DIR, EXPERIMENTS, REPO
from sweep_fixture import RATIOS, run, sweep_command, tiny_sweep

sweep = pytest.fixture(scope="session")(tiny_sweep)

# the sweeps of this repository's tables (experiments/pruning*.yaml belong to the pruning work)
SWEEPS = ["main", "ablation_importance", "ablation_location", "ablation_location_hub", "ablation_design",
          "ablation_share", "efficiency", "generation", "memory", "schedule", "positional", "hybrid",
          "hybrid_efficiency", "hybrid_generation", "efficiency_sizes", "mamba3", "mamba3_trapezoid",
          "mamba3_rotation", "long", "long_filter", "long_efficiency"]
BEYOND_PAPER = {"schedule", "positional", "hybrid", "mamba3", "mamba3_trapezoid", "mamba3_rotation", "long",
                "long_filter", "long_efficiency"}  # studies of our own, run on their own (not by experiments/paper.sh)
# the paper's efficiency protocol on hub models (experiments/gpu/generation.sh), on a hybrid (experiments/gpu/hybrid.sh),
# at every size and shape (experiments/gpu/sizes.sh), and the long-context suite (an hour a run on a CPU)
GPU_ONLY = {"generation", "memory", "hybrid_efficiency", "hybrid_generation", "efficiency_sizes", "long", "long_filter",
            "long_efficiency"}
BUNDLED = {"mamba2-tiny", "mamba-tiny", "hybrid-tiny", "mamba3-tiny"}


jobs = tables.sweep_jobs  # the override list of each job of `python run.py -m +experiment=<name>`


def every_value_once(expanded: list[list[str]]) -> list[list[str]]:
    """The first job, and for every other swept value the job that differs from it in that value only: all it
    takes to catch a bad value, at a fraction of the full product's composition time."""
    chosen, seen = [expanded[0]], set(expanded[0])
    for job in expanded:
        differs = [o for o, f in zip(job, expanded[0]) if o != f]
        if len(differs) == 1 and differs[0] not in seen:
            seen.add(differs[0])
            chosen.append(job)
    return chosen


def compose_jobs(name: str, jobs: list[list[str]], *extra: str, hydra: bool = False) -> list:
    config_lib.register_resolvers()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        return [compose("config", overrides=[f"+experiment={name}", *job, *extra], return_hydra_config=hydra)
                for job in jobs]


def compose_job(name: str, job: list[str], *extra: str, hydra: bool = False):
    return compose_jobs(name, [job], *extra, hydra=hydra)[0]


def test_every_table_has_its_sweep_file():
    names = {n for spec in tables.SPECS for n in spec.experiments}
    assert names <= {p.stem for p in EXPERIMENTS.glob("*.yaml")}
    assert set(SWEEPS) | {"pruning", "pruning_joint", "pruning_hf"} == names


def test_paper_script_runs_every_bundled_sweep_then_the_tables():
    script = (REPO / "experiments" / "paper.sh").read_text()
    loop = next(line for line in script.splitlines() if line.startswith("for experiment in"))
    assert set(loop.split(" in ")[1].rstrip("; do").split()) == \
        set(SWEEPS) - {"ablation_location_hub"} - BEYOND_PAPER - GPU_ONLY
    assert "-m ssmcompress.tables" in script.rstrip().splitlines()[-1]


@pytest.mark.parametrize("name", SWEEPS)
def test_every_swept_value_composes_and_validates(name):
    """Bad keys, methods, parameters or layer indices fail here, not hours into a sweep: every swept value is
    composed, and validated fully on the bundled models (random weights: nothing to download)."""
    missing = sorted({o.split("=", 1)[1] for job in jobs(name) for o in job if o.startswith("method=")}
                     - set(config_lib.available("method")))
    assert not missing, f"{name} sweeps methods {missing} that conf/method does not have"
    expanded = jobs(name)
    assert expanded, f"{name} sweeps nothing"
    for cfg in compose_jobs(name, every_value_once(expanded), "model.random_init=true"):
        assert cfg.skip_existing is True and cfg.tag, f"{name}: sweeps must resume (skip_existing) and be tagged"
        assert cfg.results_dir == "results", f"{name}: a sweep behind the tables writes the committed store"
        if cfg.model.name in BUNDLED and cfg.benchmark.name in ("offline", "efficiency"):
            runner.validate(cfg)


def test_sweep_grid_is_what_the_tables_expect():
    """The tables' parser reads the same grid Hydra sweeps (Table 5's seven rows come from experiments/design/)."""
    design = tables.load_experiment("ablation_design")
    assert len(jobs("ablation_design")) == 2 * 7  # both bundled models
    assert len(tables.expected_keys([design], ("model", "ratio", "design"), {"benchmark": "offline_full"},
                                    ["mamba2-tiny"])) == 7
    default = compose_job("ablation_design", ["+experiment/design=q0.5_M-only"])
    assert OmegaConf.to_container(default.method) == OmegaConf.to_container(compose_job("main", ["method=ours"]).method)
    main = tables.load_experiment("main")
    keys = tables.expected_keys([main], ("model", "ratio", "method"), {"benchmark": "offline"}, ["mamba2-tiny"])
    assert len(keys) == 1 + 6 * 3  # dense once, six methods at three budgets


def test_sweep_jobs_expand_as_the_basic_sweeper():
    """Every combination of the swept values once, the last parameter varying fastest (Hydra's basic sweeper),
    values written back as the override grammar reads them."""
    expanded = jobs("main")
    assert len(expanded) == len({tuple(j) for j in expanded}) == 2 * 7 * 3
    assert expanded[:2] == [["model=mamba2-tiny", "method=dense", "ratio=0.1"],
                            ["model=mamba2-tiny", "method=dense", "ratio=0.2"]]
    assert jobs("ablation_location")[-1] == ["model=mamba-tiny", "layers=null"]
    assert jobs("ablation_location")[0] == ["model=mamba2-tiny", "layers=[5,6,7,8,9,10,11]"]


def test_slurm_launcher_configs():
    cfg = compose_job("main", [], "hydra/launcher=slurm", hydra=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.gpus_per_node == 1 and launcher.tasks_per_node == 1 and launcher.timeout_min >= 60
    assert launcher.submitit_folder.endswith("/.submitit/%j")
    local = compose_job("main", [], "hydra/launcher=slurm_local", hydra=True).hydra.launcher
    assert local._target_.endswith("LocalLauncher")


def test_interrupted_sweep_resumes_without_loss_or_duplicates(sweep):
    killed = sweep.killed_store.splitlines()
    assert sweep.first.returncode == -9, f"the first attempt was not interrupted:\n{sweep.first.stdout[-2000:]}"
    assert 1 <= len(killed) < sweep.distinct
    final = (sweep.results / tracking.STORE).read_text().splitlines()
    assert final[: len(killed)] == killed  # nothing lost or rewritten
    keys = [json.loads(line)["key"] for line in final]
    assert len(keys) == len(set(keys)) == sweep.distinct  # nothing duplicated, nothing missing
    skipped = sweep.second.stdout.count("skip: results store")
    assert skipped == sweep.jobs - (sweep.distinct - len(killed))


def test_a_failed_run_does_not_stop_the_sweep(tmp_path):
    """A run with a bad setting (here a missing model) is reported and the sweep goes on with the next one; the
    sweep exits non-zero at its end (run.py raises instead of exiting inside a multirun)."""
    command = [sys.executable, "run.py", "-m", f"model.path={tmp_path}/missing-a,{tmp_path}/missing-b", "logger=none",
               f"results_dir={tmp_path}/results", f"hydra.sweep.dir={tmp_path}/multirun"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert all(f"error: model path '{tmp_path}/missing-{x}' does not exist" in result.stderr for x in "ab")
    assert not (tmp_path / "results" / tracking.STORE).exists()


@pytest.mark.slow
def test_submitit_local_executor_runs_new_jobs_and_skips_finished_ones(sweep, tmp_path):
    """The SLURM launcher's code path (hydra-submitit-launcher), on submitit's local executor: one job per
    subprocess; a job whose record exists skips, a new one appends."""
    results = tmp_path / "results"
    results.mkdir()
    (results / tracking.STORE).write_text((sweep.results / tracking.STORE).read_text())
    done = len(tracking.load(results))
    new_ratio = 0.1
    assert new_ratio not in RATIOS
    run(sweep_command(results, tmp_path / "multirun", sweep.methods[-1:], (RATIOS[-1], new_ratio),
                      "hydra/launcher=slurm_local"))
    records = tracking.load(results)
    assert len(records) == done + 1 and len({r["key"] for r in records}) == len(records)
    assert records[-1]["ratio"] == new_ratio and records[-1]["method"] == sweep.methods[-1]
    logs = "".join(p.read_text() for p in (tmp_path / "multirun" / ".submitit").glob("*/*_log.out"))
    assert logs.count("skip: results store") == 1


def test_the_same_sweep_launched_twice_at_once_writes_each_record_once(tmp_path):
    """Two launchers of one sweep on one store: each job claims its run key, so the other launcher skips it (or finds
    its record); every key is written exactly once."""
    methods, ratios = ["dense", "ours", "evit"], (0.2, 0.3)
    command = sweep_command(tmp_path / "results", tmp_path / "multirun-a", methods, ratios)
    twin = sweep_command(tmp_path / "results", tmp_path / "multirun-b", methods, ratios)
    launchers = [subprocess.Popen(c, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for c in (command, twin)]
    outputs = [launcher.communicate(timeout=900)[0] for launcher in launchers]
    assert all(launcher.returncode == 0 for launcher in launchers), outputs
    keys = [record["key"] for record in tracking.load(tmp_path / "results")]
    assert len(keys) == len(set(keys)) == 1 + 2 * len(ratios)  # dense once, two methods at two budgets
    skipped = sum(o.count("skip: another job is running") + o.count("skip: results store") for o in outputs)
    assert skipped == 2 * len(methods) * len(ratios) - len(keys)


def test_the_gpus_launcher_runs_a_sweep_in_parallel_workers(tmp_path):
    """hydra/launcher=gpus (joblib's worker processes, one GPU each where there are GPUs; gpu_pool): every job of the
    sweep runs and writes its record, once."""
    results = tmp_path / "results"
    out = run(sweep_command(results, tmp_path / "multirun", ["dense", "ours"], (0.2, 0.3), "hydra/launcher=gpus",
                            "hydra.launcher.n_jobs=2"))
    keys = [record["key"] for record in tracking.load(results)]
    assert len(keys) == len(set(keys)) == 3  # dense once, ours at two budgets
    assert "Joblib.Parallel(n_jobs=2" in out.stdout
