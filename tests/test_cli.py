"""The command line: unknown options and bad settings give `error: <one line>` and exit status 2, the checks run
before the heavy libraries are imported, and the README's first command leaves the checkout clean."""
import subprocess
import sys

from ssmcompress.config import REPO

HEAVY = ("mamba_ssm", "lm_eval.models.huggingface", "datasets", "wandb", "transformers")


def run_py(*overrides: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "run.py", *overrides], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def test_unknown_group_options_are_one_error_line_and_status_2():
    for overrides, message in ((["method=unknown"], "error: unknown method 'unknown': choose one of "),
                               (["model=mamba9-huge"], "error: unknown model 'mamba9-huge'"),
                               (["-m", "method=ours,nope", "ratio=0.3"], "error: unknown method 'nope'")):
        result = run_py(*overrides)
        assert result.returncode == 2 and result.stderr.splitlines() == [result.stderr.splitlines()[0]]
        assert result.stderr.startswith(message), result.stderr


def test_a_bad_setting_is_one_error_line_and_status_2(tmp_path):
    result = run_py("method=ours", "ratio=2", f"results_dir={tmp_path}", "logger=none")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: ratio must be a number with 0 < ratio < 1 (fraction of FLOPs removed), got 2"
    assert not list(tmp_path.iterdir())


def test_the_checks_run_before_the_heavy_imports():
    code = ("import sys; from hydra import compose, initialize_config_dir; from ssmcompress import runner; "
            "from ssmcompress.config import CONF_DIR; from ssmcompress.errors import ConfigError\n"
            "with initialize_config_dir(version_base='1.3', config_dir=str(CONF_DIR)):\n"
            "    cfg = compose('config', overrides=['method=ours', 'ratio=0.3', 'layers=[99]', 'logger=none'])\n"
            "try:\n    runner.validate(cfg)\nexcept ConfigError as error:\n    print('refused:', error)\n"
            f"print('loaded:', [m for m in {HEAVY!r} if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert "refused: layer 99 is outside this 12-layer model" in result.stdout, result.stderr[-2000:]
    assert "loaded: []" in result.stdout


def test_the_default_job_leaves_the_checkout_clean():
    """`make run` runs `python run.py`: its outputs (run directory, W&B files, the ad-hoc results store) are ignored by
    git; only the sweeps of conf/experiment write the committed store results/."""
    def status() -> set[str]:
        return set(subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=REPO,
                                  capture_output=True, text=True).stdout.splitlines())

    before = status()
    result = run_py("benchmark.limit=2", "benchmark.tasks=[mqar]", "benchmark.measure.repeats=1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "record" in result.stdout and "outputs/results/records.jsonl" in result.stdout
    assert status() == before
    # lm-eval's routine messages go to the run's log file only: the console shows the result table
    assert "warning:" not in result.stdout and "Overwriting default num_fewshot" not in result.stdout
