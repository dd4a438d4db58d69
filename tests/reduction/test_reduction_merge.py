"""The shared helpers: stable ranking with per-row counts, matching, weighted merging, compaction."""
import torch

from ssmcompress.reduction import merge
from reduction_fixtures import make_tokens, one_thread  # noqa: F401


def test_ranks_are_stable_and_per_row_counts_select_exactly():
    key = torch.tensor([[3.0, 1.0, 1.0, 2.0], [0.0, 0.0, 0.0, 0.0]])
    assert merge.ranks(key).tolist() == [[3, 0, 1, 2], [0, 1, 2, 3]]  # ties: the lower slot first
    eligible = torch.tensor([[True, True, False, True], [True, True, True, True]])
    chosen = merge.lowest(key, torch.tensor([2, 3]), eligible)
    assert chosen.tolist() == [[False, True, False, True], [True, True, True, False]]
    top = merge.highest(key, torch.tensor([1, 0]), eligible)
    assert top.tolist() == [[True, False, False, False], [False] * 4]


def test_alternate_counts_over_present_slots():
    present = torch.tensor([[True, True, False, True, True, False]])
    even, odd = merge.alternate(present)
    assert even.tolist() == [[True, False, False, True, False, False]]
    assert odd.tolist() == [[False, True, False, False, True, False]]


def test_best_match_hand_example_and_missing_partners():
    # slot: 0 → (1,0); 1 → (0,1); 2 → (1,0.1); 3 → (0.1,1); 4 → (0,0) zero vector
    metric = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.1, 1.0], [0.0, 0.0]]])
    src = torch.tensor([[True, False, True, False, True]])
    dst = torch.tensor([[False, True, False, True, False]])
    partner, score = merge.best_match(metric, src, dst)
    assert partner.tolist() == [[3, 1, 3, 3, 1]]  # zero vector: similarity 0 to all, first dst on ties
    assert torch.allclose(score[0, [0, 2]], torch.tensor([0.1 / 1.01 ** 0.5, 0.2 / 1.01]))
    assert score[0, 4] == 0 and score[0, 1] == -float("inf") and score[0, 3] == -float("inf")
    partner, score = merge.best_match(metric, src, torch.zeros_like(dst))
    assert partner.tolist() == [[0, 1, 2, 3, 4]] and bool((score == -float("inf")).all())


def test_average_into_conserves_the_weighted_sum_and_leaves_others_exact():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 3)
    sizes = torch.tensor([[1.0, 2.0, 3.0, 1.0, 1.0, 4.0], [1.0] * 6])
    target = torch.tensor([[0, 3, 2, 3, 4, 3], [2, 1, 2, 3, 4, 5]])
    merged = torch.tensor([[False, True, False, False, False, True], [True, False, False, False, False, False]])
    out = merge.average_into(x, target, merged, sizes)
    new_sizes = merge.carry_sizes(sizes, target, merged)
    keep = ~merged
    before = (x * sizes[..., None]).sum(1)
    after = (out * new_sizes[..., None] * keep[..., None]).sum(1)
    assert torch.allclose(before, after, atol=1e-6)
    expected = (x[0, 1] * 2 + x[0, 3] * 1 + x[0, 5] * 4) / 7
    assert torch.allclose(out[0, 3], expected)
    assert new_sizes[0].tolist() == [1.0, 0.0, 3.0, 7.0, 1.0, 0.0]
    untouched = torch.tensor([[True, False, True, False, True, False], [False, True, False, True, True, True]])
    assert torch.equal(out[untouched], x[untouched])  # bit-identical, no x*w/w rounding


def test_compact_keeps_order_and_puts_fillers_after_real_tokens():
    keep = torch.tensor([[True, False, True, True, True, True], [False, True, True, False, True, True]])
    valid = torch.tensor([[True] * 6, [True, True, True, True, False, False]])
    source, counts = merge.compact(keep, valid)
    assert counts.tolist() == [5, 2]
    assert source[0].tolist() == [0, 2, 3, 4, 5]
    assert source[1].tolist() == [1, 2, 4, 5, 0]  # its padding first, then a removed slot


def test_counting_helpers_equal_the_sorts_they_replace():
    generator = torch.Generator().manual_seed(0)
    for n in (1, 7, 64, 301):
        first = torch.rand(6, n, generator=generator) < 0.4
        second = ~first & (torch.rand(6, n, generator=generator) < 0.5)
        group = torch.where(first, 0, torch.where(second, 1, 2))
        stable = torch.sort(group, dim=1, stable=True).indices
        assert torch.equal(merge.arrange(first, first.sum(1, keepdim=True), second), stable)
        ones_first = torch.sort((~first).to(torch.uint8), dim=1, stable=True).indices
        assert torch.equal(merge.pack(first, n)[0], ones_first)
        slots = torch.arange(n).expand(6, n)
        count = torch.randint(0, n + 2, (6,), generator=generator)
        assert torch.equal(merge.first_of(first, count), merge.lowest(slots, count, first))
        assert torch.equal(merge.last_of(first, count), merge.highest(slots, count, first))


def test_gather_slots_matches_gather():
    x = torch.randn(3, 7, 4)
    index = torch.tensor([[0, 6, 2], [1, 1, 5], [3, 4, 0]])
    assert torch.equal(merge.gather_slots(x, index), x.gather(1, index[..., None].expand(3, 3, 4)))
    assert torch.equal(merge.gather_slots(x[..., 0], index), x[..., 0].gather(1, index))


def test_rows_of_and_concat_split_and_join_a_reduction_by_rows():
    torch.manual_seed(0)
    tokens = make_tokens(torch.randn(5, 12, 4), importance=torch.rand(5, 12))
    tokens.host_counts = (12, 8)
    plan = merge.Plan(torch.zeros(5, 12, dtype=torch.bool), tokens.slots, torch.zeros(5, 12, dtype=torch.bool),
                      torch.zeros(5, 12, dtype=torch.bool), None)
    plan.removed[:, :4] = True
    whole = merge.apply(tokens, plan)
    parts = [merge.apply(merge.rows_of(tokens, i, i + 2), merge.Plan(
        plan.removed[i:i + 2], plan.target[i:i + 2], plan.merge_hidden[i:i + 2], plan.merge_residual[i:i + 2],
        None)) for i in range(0, 5, 2)]
    assert merge.rows_of(tokens, 4, 6).hidden.shape == (1, 12, 4) and merge.rows_of(tokens, 0, 2).layer == tokens.layer
    joined = merge.concat(parts)
    for name in ("hidden", "residual", "hidden_sizes", "residual_sizes", "source", "counts"):
        assert torch.equal(getattr(joined, name), getattr(whole, name)), name
    assert torch.equal(joined.plan.removed, plan.removed) and joined.plan.weights is None
