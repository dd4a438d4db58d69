"""Data-parallel evaluation on a CPU: two processes of a torchrun launch (accelerate launch starts the same
processes on GPUs) with the process group on gloo, each scoring its shard of lm-eval's requests, through lm-eval's
command line and through the main job."""
import glob
import json
import os
import subprocess
import sys

from ssmcompress.config import REPO

TASKS = str(REPO / "src" / "ssmcompress" / "assets" / "tasks" / "offline")
LM_EVAL = ["--model", "ssmcompress", "--model_args", "pretrained=mamba2-tiny,method=ours,ratio=0.3", "--tasks",
           "mqar", "--include_path", TASKS, "--limit", "8", "--batch_size", "4", "--log_samples"]
RUN = ["benchmark.tasks=[mqar]", "benchmark.limit=8", "benchmark.batch_size=4", "method=ours", "ratio=0.3",
       "benchmark.measure.enabled=false", "logger=none"]
LAUNCH = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531"]
FAILING = str(REPO / "tests" / "evaluation" / "failing_rank.py")
ENV = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline")


def launch(*command) -> subprocess.CompletedProcess:
    return subprocess.run([*LAUNCH, *command], capture_output=True, text=True, env=ENV, cwd=REPO)


def samples(out) -> dict:
    rows = [json.loads(line) for path in glob.glob(f"{out}/*/samples_mqar_*.jsonl") for line in open(path)]
    return {row["doc_id"]: (row["acc"], row["resps"]) for row in rows}


def test_lm_evals_command_line_in_two_processes_scores_every_document_as_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, "-m", "ssmcompress.lmeval", *LM_EVAL, "--output_path", str(one)], check=True,
                   capture_output=True, env=ENV, cwd=REPO)
    launched = launch("-m", "ssmcompress.lmeval", *LM_EVAL, "--output_path", str(two))
    assert launched.returncode == 0, launched.stderr[-2000:]
    log = launched.stdout + launched.stderr
    assert "mqar on rank 0" in log and "mqar on rank 1" in log  # each process built its own shard
    assert len(samples(one)) == 8 and samples(two) == samples(one)  # the same scores, document for document
    assert len(glob.glob(f"{two}/*/results_*.json")) == 1  # written once, by rank 0


def test_the_main_job_in_two_processes_writes_one_record_with_every_documents_scores(tmp_path):
    from ssmcompress import runner
    from conftest import compose_config

    single = runner.run(compose_config([*RUN, f"results_dir={tmp_path / 'one'}"]), run_dir=tmp_path / "one-run")
    launched = launch("run.py", *RUN, f"results_dir={tmp_path / 'two'}", f"hydra.run.dir={tmp_path / 'two-run'}")
    assert launched.returncode == 0, launched.stderr[-2000:]
    lines = (tmp_path / "two" / "records.jsonl").read_text().splitlines()
    assert len(lines) == 1  # rank 0 alone writes
    record = json.loads(lines[0])
    assert record["metrics"] == single["metrics"] and record["samples"] == single["samples"]
    # the reduction's token counts and FLOPs are every process's, added up
    ours, theirs = record["reduction"]["observed"], single["reduction"]["observed"]
    for key in ("rows", "tokens", "final_tokens", "dense_flops", "reduced_flops", "achieved_ratio"):
        assert ours[key] == theirs[key], key


def test_a_failing_rank_leaves_no_record(tmp_path):
    launched = launch(FAILING, "run", *RUN, f"results_dir={tmp_path / 'results'}",
                      f"hydra.run.dir={tmp_path / 'run'}")
    assert launched.returncode != 0 and "rank 1 fails here" in launched.stderr
    assert not (tmp_path / "results" / "records.jsonl").exists()
