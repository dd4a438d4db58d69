"""Shared fixtures: tiny random models in mamba-ssm's hub format, and Hydra config composition."""
import os

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_UPDATE_DOWNLOAD_COUNTS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Triton kernels launched on CPU tensors (the reduction's fused kernels, forced in their tests) run under Triton's
# interpreter, chosen when a kernel is defined, so before anything imports them. Nothing else changes: on a CPU,
# compat routes every mamba-ssm kernel to its pure-torch reference, so no other Triton kernel runs.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from ssmcompress import compat, models  # noqa: E402
from ssmcompress.hosts import mamba_ssm
from ssmcompress.config import ASSETS, CONF_DIR, register_resolvers  # noqa: E402

compat.install()  # tests import mamba-ssm directly (the package itself imports it when it first builds a model)
TOKENIZER_DIR = ASSETS / "models" / "mamba2-tiny"
TINY = {
    2: dict(d_model=64, n_layer=4, vocab_size=4096, pad_vocab_size_multiple=16,
            ssm_cfg=dict(layer="Mamba2", d_state=16, headdim=16, chunk_size=16)),
    1: dict(d_model=64, n_layer=4, vocab_size=4096, pad_vocab_size_multiple=16, ssm_cfg=dict(layer="Mamba1", d_state=8)),
    3: dict(d_model=64, n_layer=4, vocab_size=4096, pad_vocab_size_multiple=16,
            ssm_cfg=dict(layer="Mamba3", d_state=16, headdim=16, chunk_size=16)),
}


@pytest.fixture
def single_thread():
    """Two threads on two shared cores are several times slower than one for tiny tensors."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(generation: int = 2, seed: int = 0, **overrides):
    config = {**TINY[generation], **overrides}
    return mamba_ssm.build_model(config, "cpu", "float32", seed=seed)


def batch_of(lengths, total, seed=0):
    """A right-padded batch of random ids with rows of `lengths` real tokens (lm-eval pads with 0), and the
    positions it protects: each row's last token, which is always scored, and one more."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 4000, (len(lengths), total), generator=generator)
    lengths = torch.tensor(lengths)
    ids[torch.arange(total) >= lengths[:, None]] = 0  # lm-eval right-pads with 0
    protect = torch.zeros(ids.shape, dtype=torch.bool)
    protect[torch.arange(len(lengths)), lengths - 1] = True  # the last token is always scored
    protect[torch.arange(len(lengths)), lengths - 3] = True
    return ids, lengths, protect


def save_tiny(directory, generation: int = 2, seed: int = 0, **overrides):
    model = tiny_model(generation, seed, **overrides)
    mamba_ssm.save_model(model, directory, tokenizer=models.load_tokenizer(str(TOKENIZER_DIR)))
    return directory


@pytest.fixture(scope="session")
def tiny_mamba2_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("mamba2-tiny-random"), 2)


@pytest.fixture(scope="session")
def tiny_mamba1_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("mamba-tiny-random"), 1)


def compose_config(overrides=()):
    register_resolvers()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        return compose("config", overrides=list(overrides))


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
