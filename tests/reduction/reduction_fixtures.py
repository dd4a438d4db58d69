"""Helpers and fixtures for the token-reduction tests (imported by each test module: a second conftest.py would
clash with tests/conftest.py under pytest's default import mode)."""
import pytest
import torch

from ssmcompress.hosts import mamba_ssm
from ssmcompress.reduction import METHODS
from ssmcompress.reduction.merge import Tokens
from conftest import tiny_model

# the methods for accuracy (every registry entry but the `ceiling` measuring device, refused on lm-eval benchmarks)
ALL_METHODS = ["ours", "official", "evit", "tome", "pumer", "random", "prune_only", "merge_only", "early",
               "early_merge", "strided", "late", "utr_early", "decimamba"]

# the registry's methods that remove tokens (longmamba sets Δ to 0 instead: test_longmamba.py)
REMOVING = [name for name, entry in METHODS.items() if not entry.filters_delta]


@pytest.fixture(autouse=True)
def one_thread(single_thread):
    """Every test here runs on one thread (conftest.single_thread)."""


@pytest.fixture(scope="module")
def mamba2():
    """A random 12-layer Mamba-2 (the bundled tiny models' depth: default anchors [2..8])."""
    model = tiny_model(2, seed=1, n_layer=12)
    return model, mamba_ssm.model_info(model)


@pytest.fixture(scope="module")
def mamba1():
    model = tiny_model(1, seed=1, n_layer=6)
    return model, mamba_ssm.model_info(model)


def make_tokens(hidden, importance=None, residual=None, valid=None, protect=None, sizes=None, layer=0):
    """Tokens for calling a method directly; hidden (b, n, d) or (n, d) for one row."""
    hidden = torch.as_tensor(hidden, dtype=torch.float32)
    if hidden.dim() == 2:
        hidden = hidden[None]
    b, n, _ = hidden.shape

    def rows(x, dtype):
        x = torch.as_tensor(x, dtype=dtype)
        return x[None] if x.dim() == 1 else x

    importance = rows(importance, torch.float32) if importance is not None else torch.zeros(b, n)
    residual = hidden.clone() if residual is None else torch.as_tensor(residual, dtype=torch.float32).reshape(b, n, -1)
    valid = rows(valid, torch.bool) if valid is not None else torch.ones(b, n, dtype=torch.bool)
    protect = rows(protect, torch.bool) if protect is not None else torch.zeros(b, n, dtype=torch.bool)
    sizes = rows(sizes, torch.float32) if sizes is not None else torch.ones(b, n)
    positions = torch.arange(n).expand(b, n)
    return Tokens(hidden, residual, importance, sizes.clone(), sizes.clone(), valid, protect & valid, positions, layer)


def compose(method, ratio=0.3, *extra):
    from conftest import compose_config

    return compose_config([f"method={method}", f"ratio={ratio}", *extra])
