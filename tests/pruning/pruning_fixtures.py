"""Helpers for the pruning tests (imported by each module: a second conftest.py would clash with tests/conftest.py)."""
import pytest
import torch

from ssmcompress.pruning.hessian import LayerInputs


@pytest.fixture(autouse=True)
def one_thread(single_thread):
    """Every test here runs on one thread (conftest.single_thread)."""


def random_layer(rows: int = 6, columns: int = 16, tokens: int = 200, seed: int = 0):
    """A weight and correlated calibration inputs (fp64, so closed forms can be compared tightly)."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(columns, columns, generator=generator, dtype=torch.float64)
    x = torch.randn(tokens, columns, generator=generator, dtype=torch.float64) @ mixing
    weight = torch.randn(rows, columns, generator=generator, dtype=torch.float64)
    return weight, x, LayerInputs.of(x)


def output_loss(before: torch.Tensor, after: torch.Tensor, x: torch.Tensor) -> float:
    """||W X - Ŵ X||² over the calibration tokens."""
    return float(((before - after) @ x.T).pow(2).sum())


def zeros_per_group(weight: torch.Tensor, m: int) -> torch.Tensor:
    return (weight.reshape(weight.shape[0], -1, m) == 0).sum(dim=-1)
