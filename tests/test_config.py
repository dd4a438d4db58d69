"""The run key: the same run has the same key in every checkout and on every machine (resume and de-duplication
depend on it); user files count by content, bundled files by their place in the package."""
import json
import shutil
import subprocess
import sys

from conftest import compose_config, save_tiny
from ssmcompress.config import PACKAGE, portable_path, run_key, to_dict

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
    assert portable_path(str(PACKAGE / "assets" / "models" / "mamba2-tiny")) == "asset:models/mamba2-tiny"


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
