"""Sparsity patterns and the shared mask rules: exact counts, N:M groups, clear errors."""
import pytest
import torch

from ssmcompress.pruning.masks import (Pattern, follows_nm, nm_mask, parse_pattern, removal_count, smallest,
                                       unstructured_mask, zero_fraction)
from pruning_fixtures import one_thread  # noqa: F401


def test_parse_pattern():
    assert parse_pattern(0.5) == Pattern(0.5)
    assert parse_pattern(0) == Pattern(0.0)
    assert parse_pattern("0.25") == Pattern(0.25)
    assert parse_pattern("2:4") == Pattern(0.5, 2, 4)
    assert parse_pattern(" 4 : 8 ") == Pattern(0.5, 4, 8)
    assert str(parse_pattern("2:4")) == "2:4" and str(parse_pattern(0.5)) == "0.5"


@pytest.mark.parametrize("bad", [1, 1.5, -0.1, "3:2", "0:4", "4:4", "half", None, True, "2:4:8"])
def test_bad_patterns_are_rejected(bad):
    with pytest.raises(ValueError, match="sparsity|N:M"):
        parse_pattern(bad)


def test_removal_count_is_robust_to_float_noise():
    assert removal_count(0.7, 10) == 7 and removal_count(0.5, 7) == 3 and removal_count(0.0, 100) == 0


def test_smallest_is_stable_and_exact():
    scores = torch.tensor([[3.0, 1.0, 1.0, 2.0]])
    assert smallest(scores, 2, dim=1).tolist() == [[False, True, True, False]]
    assert smallest(scores, 1, dim=1).tolist() == [[False, True, False, False]]  # ties: the first index


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_mask_has_exactly_n_per_group(n, m):
    scores = torch.rand(5, 32)
    mask = nm_mask(scores, n, m)
    assert (mask.reshape(5, -1, m).sum(-1) == n).all()
    kept = scores.masked_fill(mask, float("inf")).reshape(5, -1, m)
    removed = scores.masked_fill(~mask, -float("inf")).reshape(5, -1, m)
    assert (removed.max(-1).values <= kept.min(-1).values).all()  # the n lowest of each group
    assert follows_nm(torch.where(mask, 0.0, 1.0), n, m)


def test_nm_mask_needs_a_width_multiple_of_m():
    with pytest.raises(ValueError, match="multiple of 8"):
        nm_mask(torch.rand(2, 12), 4, 8)


def test_unstructured_mask_per_row_and_per_matrix():
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]])
    assert unstructured_mask(scores, 0.5, per_row=True).sum(1).tolist() == [2, 2]
    per_matrix = unstructured_mask(scores, 0.5, per_row=False)
    assert per_matrix.tolist() == [[True, True, True, True], [False, False, False, False]]
    assert zero_fraction(torch.where(per_matrix, 0.0, 1.0)) == 0.5
