"""The run key: the same run has the same key in every checkout and on every machine (resume and de-duplication
depend on it); user files count by content, bundled files by their place in the package and their content."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import compose_config, save_tiny
from ssmcompress import config as config_lib
from ssmcompress.config import PACKAGE, content_digest, portable_path, run_key, to_dict

REPO = Path(__file__).resolve().parents[1]

KEY_OF_DEFAULT = "from conftest import compose_config; from ssmcompress.config import run_key; import ssmcompress; " \
                 "print(ssmcompress.__file__); print(run_key(compose_config(['method=ours', 'ratio=0.3'])))"


def test_the_run_key_is_the_same_in_two_clones(tmp_path):
    keys = []
    for clone in ("a", "b"):
        shutil.copytree(PACKAGE, tmp_path / clone / "src" / "ssmcompress",
                        ignore=shutil.ignore_patterns("__pycache__"))
        result = subprocess.run([sys.executable, "-c", KEY_OF_DEFAULT], capture_output=True, text=True, timeout=120,
                                cwd=PACKAGE.parents[1] / "tests",
                                env={"PYTHONPATH": f"{tmp_path / clone / 'src'}:.", "PATH": "/usr/bin:/bin"})
        assert result.returncode == 0, result.stderr[-2000:]
        module, key = result.stdout.split()
        assert module.startswith(str(tmp_path / clone))  # that clone's package, not this one
        keys.append(key)
    assert keys[0] == keys[1] == run_key(compose_config(["method=ours", "ratio=0.3"]))


def test_a_record_written_elsewhere_keys_as_a_run_here():
    cfg = compose_config(["method=ours", "ratio=0.3"])
    elsewhere = json.loads(json.dumps(to_dict(cfg)).replace(str(PACKAGE), "/home/someone/ssmcompress/src/ssmcompress"))
    assert elsewhere["model"]["path"].startswith("/home/someone") and run_key(elsewhere) == run_key(cfg)
    assert portable_path(str(PACKAGE / "assets" / "models" / "mamba2-tiny")) == \
        f"asset:models/mamba2-tiny@{content_digest(PACKAGE / 'assets' / 'models' / 'mamba2-tiny')}"


def test_a_retrained_bundled_model_is_a_new_run(tmp_path, monkeypatch):
    assets = tmp_path / "assets"
    shutil.copytree(PACKAGE / "assets" / "models" / "mamba2-tiny", assets / "models" / "mamba2-tiny")
    monkeypatch.setattr(config_lib, "ASSETS", assets)
    config_lib.asset_digest.cache_clear()
    cfg = compose_config(["method=ours", "ratio=0.3"])
    try:
        before = run_key(cfg)
        weights = assets / "models" / "mamba2-tiny" / "pytorch_model.bin"
        data = bytearray(weights.read_bytes())
        data[-1] ^= 1  # one bit of the last parameter
        weights.write_bytes(bytes(data))
        config_lib.asset_digest.cache_clear()
        assert run_key(cfg) != before
    finally:
        config_lib.asset_digest.cache_clear()


def test_user_checkpoints_are_keyed_by_content_not_by_place(tmp_path):
    first = save_tiny(tmp_path / "one" / "model")
    second = shutil.copytree(first, tmp_path / "two" / "model")

    def key(path):
        return run_key(compose_config(["model=local", f"model.path={path}"]))

    assert key(first) == key(second)
    config = json.loads((second / "config.json").read_text())
    (second / "config.json").write_text(json.dumps({**config, "n_layer": 3}))
    assert key(first) != key(second)


def test_hub_names_stay_names():
    assert portable_path("state-spaces/mamba2-2.7b") == "state-spaces/mamba2-2.7b"


def test_a_committed_sweeps_runs_keep_their_keys():
    # the committed store's records are found again by the sweep that made them (skip_existing, the tables' newest per
    # key): a setting added to the model configs later must not change them
    keys = {json.loads(line)["key"] for line in (REPO / "results" / "records.jsonl").read_text().splitlines()}
    for overrides in (["+experiment=main", "method=ours", "ratio=0.3"], ["+experiment=main", "model=mamba-tiny",
                                                                         "method=tome", "ratio=0.1"]):
        assert run_key(compose_config(overrides)) in keys, overrides
    longmamba = compose_config(["method=longmamba"])
    shorter = compose_config(["method=longmamba", "model.train_length=128"])
    assert run_key(longmamba) != run_key(shorter)  # where it is read, it is part of the key
