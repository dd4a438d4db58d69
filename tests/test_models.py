"""Model adapter: hub-format local directories, random init, and clear errors for unusable sources."""
import json

import pytest
import torch

from ssmcompress import models
from ssmcompress.hosts import mamba_ssm
from conftest import TINY, tiny_model


def test_save_and_load_local_hub_format_directory(tmp_path):
    for generation in (2, 1):
        model = tiny_model(generation, seed=3)
        directory = tmp_path / f"gen{generation}"
        mamba_ssm.save_model(model, directory)
        assert {p.name for p in directory.iterdir()} >= {"config.json", "pytorch_model.bin"}
        assert "use_mem_eff_path" not in json.loads((directory / "config.json").read_text())["ssm_cfg"]
        loaded = mamba_ssm.load_model(str(directory), device="cpu", dtype="float32")
        ids = torch.randint(0, 4096, (2, 20))
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, model(ids).logits)
        assert loaded.lm_head.weight.data_ptr() == loaded.backbone.embedding.weight.data_ptr()  # still tied


def test_saved_weights_stay_tied_in_the_file(tmp_path):
    model = tiny_model(2)
    mamba_ssm.save_model(model, tmp_path, dtype=torch.float16)
    state = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    assert state["lm_head.weight"].data_ptr() == state["backbone.embedding.weight"].data_ptr()
    assert state["lm_head.weight"].dtype == torch.float16


def test_random_init_builds_any_size_without_weights():
    model = mamba_ssm.load_model("state-spaces/does-not-matter", device="cpu", dtype="float32", random_init=True,
                              config=TINY[2])
    info = mamba_ssm.model_info(model)
    assert info["mamba_version"] == 2 and info["n_layer"] == 4 and info["chunk_size"] == 16


def test_dtype_and_device_resolution():
    assert models.resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert models.resolve_dtype("auto", torch.device("cuda")) == torch.float16
    assert models.resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(models.ModelSourceError, match="invalid dtype"):
        models.resolve_dtype("float8", torch.device("cpu"))
    with pytest.raises(models.ModelSourceError, match="invalid device"):
        models.resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(models.ModelSourceError, match="CUDA is not available"):
            models.resolve_device("cuda")


def test_clear_errors_for_unusable_sources(tmp_path, monkeypatch):
    with pytest.raises(models.ModelSourceError, match="no config.json"):
        mamba_ssm.load_config(str(tmp_path))
    with pytest.raises(models.ModelSourceError, match="does not exist"):
        mamba_ssm.load_config(str(tmp_path / "missing" / "dir"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(models.ModelSourceError, match="offline mode is set.*not in the local cache.*model.path=DIR"):
        mamba_ssm.load_config("state-spaces/mamba2-2.7b-not-cached")


def test_bundled_tokenizer_pads_with_eos():
    from conftest import TOKENIZER_DIR

    tokenizer = models.load_tokenizer(str(TOKENIZER_DIR))
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 0
    assert len(tokenizer) == 4096
