"""The package installs and works without the checkout: a built wheel declares its dependencies, ships its configs
and bundled files, and its console scripts run the default job in a fresh virtual environment.

The fresh environment gets this environment's third-party packages through a path file (there is no network to
install them again), never this checkout or its editable install."""
import json
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

from ssmcompress.config import REPO

EDITABLE = ("__editable__", "ssmcompress")  # this checkout's editable install: not visible in the fresh venv


def sh(*command, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=900, **kwargs)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def test_a_built_wheel_runs_the_default_job_in_a_fresh_venv(tmp_path):
    sh(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path / "dist",
       REPO, cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("ssmcompress-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        entry_points = archive.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert {"ssmcompress/conf/config.yaml", "ssmcompress/conf/experiment/main.yaml",
            "ssmcompress/assets/models/mamba2-tiny/pytorch_model.bin"} <= set(names)
    requires = [line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    assert any(r.startswith("mamba-ssm") for r in requires) and any(r.startswith("lm_eval") for r in requires)
    for script in ("ssmcompress-run", "ssmcompress-tables", "ssmcompress-lm-eval"):
        assert script in entry_points

    # a fresh venv that sees this environment's dependencies but not this checkout
    venv = tmp_path / "venv"
    sh(sys.executable, "-m", "venv", venv)
    deps = tmp_path / "site-packages"
    deps.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not entry.name.startswith(EDITABLE) and not entry.name.endswith(".pth"):
            (deps / entry.name).symlink_to(entry)
    fresh = venv / "bin" / "python"
    purelib = sh(fresh, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip()
    (Path(purelib) / "dependencies.pth").write_text(f"{deps}\n")
    sh(fresh, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel)

    # every declared dependency is satisfied where it runs, and the package is the wheel's
    check = ("import importlib.metadata as m, json; from packaging.requirements import Requirement; "
             "import ssmcompress; bad = [str(r) for r in map(Requirement, m.requires('ssmcompress')) "
             "if (r.marker is None or r.marker.evaluate({'extra': ''})) and r.name != 'mamba-ssm' "
             "and m.version(r.name) not in r.specifier]; print(json.dumps([ssmcompress.__file__, bad]))")
    module, unsatisfied = json.loads(sh(fresh, "-c", check, cwd=tmp_path).stdout)
    assert module.startswith(str(venv)) and unsatisfied == []

    work = tmp_path / "work"
    work.mkdir()
    run = sh(venv / "bin" / "ssmcompress-run", "logger=none", "benchmark.limit=3", "benchmark.measure.repeats=1",
             cwd=work)
    (record,) = [json.loads(line) for line in (work / "outputs" / "results" / "records.jsonl").read_text().splitlines()]
    assert record["model"] == "mamba2-tiny" and set(record["metrics"]) == {
        "shakespeare_lastword", "shakespeare_continuation", "mqar", "story_qa"}
    assert record["config"]["model"]["path"].startswith(str(venv))  # the wheel's bundled model
    assert record["git"]["commit"] is None and record["git"]["version"] == "0.1.0"
    assert "average" in run.stdout
    tables = sh(venv / "bin" / "ssmcompress-tables", "--results", work / "outputs" / "results", "--out",
                work / "tables", cwd=work)
    assert "wrote" in tables.stdout
