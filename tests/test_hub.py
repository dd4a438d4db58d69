"""The hub path through huggingface_hub's own handling, against a local stand-in for the hub: a mirror on another
port, a proxy, offline mode by either variable, fast one-line errors (one request, no retries), dataset configs."""
import json
import os
import subprocess
import sys

import pytest

from conftest import TINY
from fake_hub import FakeHub, Proxy
from ssmcompress.config import PACKAGE

CONFIG = json.dumps(TINY[2]).encode()
LOAD = "from ssmcompress.hosts import mamba_ssm; print(mamba_ssm.load_config('org/model')['d_model'])"


def python(code: str, tmp_path, **env) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter (huggingface_hub reads its endpoint, cache and proxies at import)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_", "HTTP", "http", "NO_"))}
    clean.update(HF_HOME=str(tmp_path / "hf"), PYTHONPATH=str(PACKAGE.parent), **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=clean)


@pytest.fixture
def hub():
    with FakeHub(files={"org/model": {"config.json": CONFIG, "pytorch_model.bin": b"weights"}},
                 datasets={"org/data"}) as server:
        yield server


def test_a_mirror_on_another_port_serves_configs(hub, tmp_path):
    result = python(LOAD + "; mamba_ssm.check_weights('org/model')", tmp_path, HF_ENDPOINT=hub.endpoint)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-1] == str(TINY[2]["d_model"])
    assert ("HEAD", "/org/model/resolve/main/config.json") in hub.requests
    assert ("HEAD", "/org/model/resolve/main/pytorch_model.bin") in hub.requests  # asked for, not downloaded
    again = python(LOAD, tmp_path, HF_ENDPOINT=hub.endpoint, HF_HUB_OFFLINE="1")
    assert again.returncode == 0, again.stderr[-2000:]  # the cached config needs no hub


def test_a_proxy_is_used_as_the_environment_says(hub, tmp_path):
    endpoint = f"http://hub.invalid:{hub.port}"  # resolvable only by the proxy
    with Proxy(routes={"hub.invalid": hub.port}) as proxy:
        result = python(LOAD, tmp_path, HF_ENDPOINT=endpoint, HTTP_PROXY=f"http://127.0.0.1:{proxy.port}")
        assert result.returncode == 0, result.stderr[-2000:]
        assert any(host == "hub.invalid" for _, host, _ in proxy.requests)
    direct = python(LOAD, tmp_path / "other", HF_ENDPOINT=endpoint)
    assert direct.returncode != 0 and "did not answer" in direct.stderr.splitlines()[-1]


@pytest.mark.parametrize("variable", ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"])
def test_either_offline_variable_means_offline(hub, tmp_path, variable):
    result = python(LOAD, tmp_path, HF_ENDPOINT=hub.endpoint, **{variable: "1"})
    assert "offline mode is set" in result.stderr.splitlines()[-1]
    assert hub.requests == []  # not even asked


def test_an_unanswering_hub_is_asked_once_and_reported_in_one_line(tmp_path):
    with FakeHub() as silent:
        endpoint = silent.endpoint
    result = python(LOAD, tmp_path, HF_ENDPOINT=endpoint)  # the port is closed now: connection refused
    last = result.stderr.strip().splitlines()[-1]
    assert "ModelSourceError: cannot fetch 'org/model': the Hugging Face hub at" in last and endpoint in last
    assert "Retrying" not in result.stderr  # huggingface_hub's five retries with back-off are not taken


def test_unknown_repositories_and_files_say_so(hub, tmp_path):
    missing = python("from ssmcompress.hosts import mamba_ssm; mamba_ssm.load_config('org/nothing')", tmp_path,
                     HF_ENDPOINT=hub.endpoint)
    assert "'org/nothing' is not a model repository" in missing.stderr.splitlines()[-1]
    no_weights = python("from ssmcompress import hub; hub.require('org/model', 'model.safetensors')", tmp_path,
                        HF_ENDPOINT=hub.endpoint)
    assert "has no file 'model.safetensors'" in no_weights.stderr.splitlines()[-1]


def test_datasets_are_looked_up_on_the_mirror(hub, tmp_path):
    code = ("from ssmcompress import hub; hub.require_datasets([('org/data', 'cfg')], 'bench'); print('ok'); "
            "hub.require_datasets([('org/absent', None)], 'bench')")
    result = python(code, tmp_path, HF_ENDPOINT=hub.endpoint)
    assert result.stdout.strip() == "ok"
    assert "bench: 'org/absent' is not a dataset repository" in result.stderr.splitlines()[-1]
