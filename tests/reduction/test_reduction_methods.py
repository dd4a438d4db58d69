"""Each method against a hand-worked example of its reference algorithm, and the properties all methods share."""
import math

import pytest
import torch

from ssmcompress import reduction
from ssmcompress.reduction import METHODS, budget, methods, patch
from reduction_fixtures import REMOVING, compose, make_tokens, mamba1, mamba2, one_thread  # noqa: F401
from ssmcompress.config import ConfigError

# six tokens, two channels: A = {0, 2, 4} by importance; 0 ~ 1 and 2 ~ 3 are near-duplicates
HIDDEN = [[1.0, 0.0], [1.0, 0.05], [0.0, 1.0], [0.1, 1.0], [1.0, 1.0], [-1.0, 0.2]]
IMPORTANCE = [0.1, 0.9, 0.2, 0.8, 0.3, 0.7]
RESIDUAL = [[float(i), 10.0 * i] for i in range(6)]


def utr_example(**params):
    tokens = make_tokens(HIDDEN, IMPORTANCE, residual=RESIDUAL)
    return tokens, methods.utr(tokens, torch.tensor([2]), **params)


def test_utr_hand_worked_hybrid_prunes_the_most_similar_link_and_merges_the_other():
    # links: 0→1 (cos 0.9988), 2→3 (0.9950), 4→3 (0.774); the two best are removed, q = 0.5 prunes 1 of them
    tokens, out = utr_example()
    assert tokens.positions[0, out.source[0]].tolist() == [1, 3, 4, 5]
    hidden, residual = out.hidden[0], out.residual[0]
    assert torch.equal(hidden[0], tokens.hidden[0, 1])  # 0 was pruned in the hidden stream: 1 unchanged
    assert torch.allclose(hidden[1], (tokens.hidden[0, 2] + tokens.hidden[0, 3]) / 2)  # 2 merged into 3
    assert torch.allclose(residual[0], torch.tensor([0.5, 5.0]))  # residual = merge: (r0 + r1) / 2
    assert torch.allclose(residual[1], torch.tensor([2.5, 25.0]))
    assert out.plan.target[0, :3].tolist() == [1, 1, 3]
    assert out.residual_sizes[0].tolist() == [2.0, 2.0, 1.0, 1.0] and out.hidden_sizes[0].tolist() == [1, 2, 1, 1]


def test_utr_link_choice_and_stream_strategies():
    tokens, out = utr_example(prune_links="least_similar")
    assert torch.allclose(out.hidden[0, 0], (tokens.hidden[0, 0] + tokens.hidden[0, 1]) / 2)
    assert torch.equal(out.hidden[0, 1], tokens.hidden[0, 3])
    tokens, out = utr_example(hidden="prune", residual="prune")
    assert torch.equal(out.hidden[0], tokens.hidden[0, [1, 3, 4, 5]])
    assert torch.equal(out.residual[0], tokens.residual[0, [1, 3, 4, 5]])
    tokens, out = utr_example(hidden="hybrid", residual="hybrid", hidden_q=1.0, residual_q=0.0)
    assert torch.equal(out.hidden[0], tokens.hidden[0, [1, 3, 4, 5]])  # q = 1: prune-only
    assert torch.allclose(out.residual[0, :2], torch.tensor([[0.5, 5.0], [2.5, 25.0]]))  # q = 0: merge-only


def test_utr_removes_at_most_the_less_important_half():
    tokens = make_tokens(HIDDEN, IMPORTANCE)
    out = methods.utr(tokens, torch.tensor([5]))
    assert out.counts.tolist() == [3] and tokens.positions[0, out.source[0]].tolist() == [1, 3, 5]


def test_evit_keeps_the_most_important_in_order():
    scores = [5.0, 1.0, 4.0, 2.0, 3.0]
    tokens = make_tokens(torch.randn(5, 3), scores)
    out = methods.evit(tokens, torch.tensor([2]))
    assert out.source[0].tolist() == [0, 2, 4]  # not the official code's {1, 2, 3} (it keeps the lowest)
    assert torch.equal(out.hidden[0], tokens.hidden[0, [0, 2, 4]])


def test_evit_fused_token_is_the_softmax_weighted_dropped_tokens_at_the_latest_position():
    scores = [5.0, 1.0, 4.0, 2.0, 3.0]
    tokens = make_tokens(torch.randn(5, 3), scores)
    out = methods.evit(tokens, torch.tensor([2]), fuse_token=True)
    assert out.source[0].tolist() == [0, 2, 4]  # dropped {1, 3, 4} fused at position 4
    weights = torch.softmax(torch.tensor([1.0, 2.0, 3.0]), 0)
    fused = (weights[:, None] * tokens.hidden[0, [1, 3, 4]]).sum(0)
    assert torch.allclose(out.hidden[0, 2], fused, atol=1e-6)
    assert torch.equal(out.hidden[0, :2], tokens.hidden[0, [0, 2]])


def test_tome_hand_worked_size_weighted_merge():
    # A = {0, 2, 4}, B = {1, 3, 5}; 4 ~ 5 is the best link, then 0 ~ 1
    hidden = [[1.0, 0.0], [1.0, 0.2], [0.0, 1.0], [-1.0, 0.0], [1.0, 1.0], [1.0, 1.01]]
    tokens = make_tokens(hidden, sizes=[1.0, 2.0, 1.0, 1.0, 3.0, 1.0])
    out = methods.tome(tokens, torch.tensor([1]))
    assert out.source[0].tolist() == [0, 1, 2, 3, 5]
    expected = (3 * tokens.hidden[0, 4] + 1 * tokens.hidden[0, 5]) / 4
    assert torch.allclose(out.hidden[0, 4], expected) and out.hidden_sizes[0, 4] == 4
    out = methods.tome(tokens, torch.tensor([2]))
    assert out.source[0].tolist() == [1, 2, 3, 5]
    assert torch.allclose(out.hidden[0, 0], (tokens.hidden[0, 0] + 2 * tokens.hidden[0, 1]) / 3)
    # a protected destination is out of the matching: 0 now has only 3 and 5 to go to
    protected = make_tokens(hidden, sizes=[1.0, 2.0, 1.0, 1.0, 3.0, 1.0], protect=[False, True] + [False] * 4)
    out = methods.tome(protected, torch.tensor([2]))
    assert out.plan.target[0, 0] == 5 and not bool(out.plan.removed[0, 1])


def test_tome_merges_at_most_half_the_movable_tokens_of_an_odd_row():
    # ToMe: r = min(r, (t - protected) // 2); A = {0, 2, 4, 6} could lose all four of a row of 7
    torch.manual_seed(3)
    tokens = make_tokens(torch.randn(7, 4))
    assert methods.tome(tokens, torch.tensor([6])).counts.tolist() == [4]  # 7 - 7 // 2
    protected = make_tokens(torch.randn(7, 4), protect=[False] * 6 + [True])  # 6 movable: at most 3
    assert methods.tome(protected, torch.tensor([6])).counts.tolist() == [4]
    both = make_tokens(torch.randn(2, 9, 4), valid=torch.arange(9) < torch.tensor([9, 5])[:, None])
    assert methods.tome(both, torch.tensor([9, 9])).counts.tolist() == [5, 3]


def test_pumer_merges_at_most_half_the_movable_survivors():
    torch.manual_seed(4)
    tokens = make_tokens(torch.randn(9, 4), torch.rand(9))
    out = methods.pumer(tokens, torch.tensor([8]), prune_r=1.0, merge_r=3.0)  # prune 2, then 7 survivors: merge 3
    assert int(out.plan.removed.sum()) == 5 and out.counts.tolist() == [4]
    assert int(out.plan.merge_hidden.sum()) == 3


def test_pumer_prunes_the_least_important_then_merges_among_survivors():
    hidden = [[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [1.0, 2.0], [1.0, 2.1], [-1.0, 0.0]]
    importance = [0.5, 0.1, 0.6, 0.7, 0.8, 0.9]
    tokens = make_tokens(hidden, importance)
    out = methods.pumer(tokens, torch.tensor([2]), prune_r=1.0, merge_r=1.0)
    # slot 1 pruned; survivors 0, 2, 3, 4, 5 alternate A = {0, 3, 5}, B = {2, 4}; 3 ~ 4 merges
    assert out.source[0].tolist() == [0, 2, 4, 5]
    assert torch.allclose(out.hidden[0, 2], (tokens.hidden[0, 3] + tokens.hidden[0, 4]) / 2)
    assert out.plan.merge_hidden[0].tolist() == [False, False, False, True, False, False]


def test_random_follows_the_top_level_seed(mamba2):
    model, info = mamba2
    ids = torch.randint(1, 4000, (1, 60))
    kept = []
    for seed in (0, 1):
        reducer = reduction.from_config(model, compose("random", 0.3, f"seed={seed}"), info)
        assert reducer.setup.params["seed"] == seed
        kept.append(reducer(ids).positions[0].tolist())
        reducer.remove()
    assert kept[0] != kept[1]


def test_random_is_reproducible_batch_independent_and_seeded():
    torch.manual_seed(0)
    hidden = torch.randn(2, 20, 4)
    valid = torch.ones(2, 20, dtype=torch.bool)
    valid[1, 12:] = False
    tokens = make_tokens(hidden, valid=valid)
    out = methods.random_prune(tokens, torch.tensor([5, 3]), seed=3)
    assert out.counts.tolist() == [15, 9]
    alone = methods.random_prune(make_tokens(hidden[1:, :12]), torch.tensor([3]), seed=3)
    assert out.source[1, :9].tolist() == alone.source[0].tolist()
    other = methods.random_prune(tokens, torch.tensor([5, 3]), seed=4)
    assert out.source[0].tolist() != other.source[0].tolist()


# ------------------------------------------------------------------------------------------------ official


def official_reference(hidden, residual, ratio, hidden_strategy, residual_strategy, clip):
    """ToR_SSM's PoMMamba.forward + bipartite_hybrid_{pure,merge,prune} + merge_wavg, transcribed (batch of
    equal-length rows, no protection). Only change: a stable edge sort, and topk over the all-ones size column
    taken as its first k entries (torch leaves the choice among ties unspecified)."""
    attn = hidden.clamp(min=0) if clip else hidden
    n = hidden.shape[1]
    r = min(n - math.ceil(n * ratio), n // 2)
    metric = attn / attn.norm(dim=-1, keepdim=True)
    ordered = metric.sort(dim=1, descending=True)[0]
    a, b = ordered[:, n // 2:], ordered[:, : n // 2]
    node_max, node_idx = (a @ b.transpose(-1, -2)).max(dim=-1)
    edge_idx = node_max.sort(dim=-1, descending=True, stable=True).indices[..., None]
    unm_idx, src_idx = edge_idx[:, r:], edge_idx[:, :r]
    dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
    unm_idx, src_idx = unm_idx.sort(dim=1)[0], src_idx.sort(dim=1)[0]

    def merge(x, strategy, is_size):
        src, dst = x[:, ::2], x[:, 1::2]
        batch, t1, c = src.shape
        unm = src.gather(-2, unm_idx.expand(batch, t1 - r, c))
        src = src.gather(-2, src_idx.expand(batch, r, c))
        if strategy == "prune":
            src = torch.zeros_like(src)
        elif strategy == "hybrid":
            k = r // 2
            top = torch.arange(k).expand(batch, k)[..., None].expand(batch, k, c) if is_size else src.topk(k, dim=1)[1]
            src = src * torch.zeros_like(src).scatter_(1, top, 1)
        dst = dst.scatter_reduce(-2, dst_idx.expand(batch, r, c), src, reduce="sum")
        return torch.cat([unm, dst], dim=-2)

    def unmerge(x):
        unm, dst = x[:, : unm_idx.shape[1]], x[:, unm_idx.shape[1]:]
        out = torch.zeros(x.shape[0], n, x.shape[-1])
        out[:, 1::2] = dst
        out.scatter_(-2, (2 * unm_idx).expand(-1, -1, x.shape[-1]), unm)
        return out

    results = []
    for x, strategy in ((hidden, hidden_strategy), (residual, residual_strategy)):
        size = torch.ones_like(x[..., :1])
        merged = merge(x * size, strategy, False) / merge(size, strategy, True)
        full = unmerge(merged)
        results.append(full[full.abs().sum(-1) != 0].reshape(x.shape[0], n - r, -1))
    return results


@pytest.mark.parametrize("strategies", [("hybrid", "merge"), ("merge", "prune"), ("hybrid", "hybrid")])
@pytest.mark.parametrize("clip,n", [(True, 24), (False, 24), (False, 17)])
def test_official_matches_the_transcribed_code(strategies, clip, n):
    torch.manual_seed(n)
    hidden, residual = torch.randn(2, n, 8), torch.randn(2, n, 8)
    ratio = 0.8
    expected = official_reference(hidden, residual, ratio, *strategies, clip)
    tokens = make_tokens(hidden, residual=residual)
    n_remove = torch.full((2,), n - math.ceil(n * ratio))
    out = methods.official(tokens, n_remove, hidden=strategies[0], residual=strategies[1],
                           importance="clip" if clip else "raw")
    assert torch.allclose(out.hidden, expected[0], atol=1e-5)
    assert torch.allclose(out.residual, expected[1], atol=1e-5)


def test_official_clip_removes_the_first_even_positions_into_position_one():
    torch.manual_seed(0)
    tokens = make_tokens(torch.randn(3, 40, 16))
    out = methods.official(tokens, torch.tensor([6, 6, 6]), hidden="merge", residual="merge")
    assert out.plan.removed[:, :12:2].all() and out.plan.removed.sum().item() == 18
    assert bool((out.plan.target[out.plan.removed] == 1).all())
    expected = tokens.hidden[:, [0, 1, 2, 4, 6, 8, 10]].mean(1)
    assert torch.allclose(out.hidden[:, 0], expected, atol=1e-6)


def test_official_clip_with_exact_ties_still_removes_the_first_even_positions():
    """All-zero rows of the per-channel-sorted clipped metric tie at score 0 (each channel here has at most 3 of 20
    positive values, so a-rows 0.. are zero): our stable tie rule keeps the documented positional result, and
    so does the transcribed code with a stable sort (the code's unstable argsort may pick other even positions)."""
    torch.manual_seed(5)
    hidden = -torch.rand(2, 20, 8)
    hidden[:, [3, 9, 14]] = torch.rand(2, 3, 8)  # a few positive tokens; all others clip to zero
    ordered = hidden.clamp(min=0).sort(dim=1, descending=True).values
    assert bool((ordered[:, 10:] == 0).all()), "every a-row ties at 0"
    tokens = make_tokens(hidden, residual=torch.randn(2, 20, 8))
    out = methods.official(tokens, torch.tensor([6, 6]), hidden="merge", residual="merge")
    for row in range(2):
        assert out.plan.removed[row].nonzero().flatten().tolist() == [0, 2, 4, 6, 8, 10]
        assert set(out.plan.target[row][out.plan.removed[row]].tolist()) == {1}
    expected = official_reference(hidden, tokens.residual, 0.7, "merge", "merge", True)
    assert torch.allclose(out.residual, expected[1], atol=1e-6)


# ------------------------------------------------------------------------------------------------ positional


def kept_positions(out, row=0):
    return out.source[row, : out.counts[row]].tolist()


def test_early_and_late_prune_the_earliest_and_the_latest_movable_tokens():
    tokens = make_tokens(torch.randn(8, 3), protect=[True, False, False, True, False, False, False, True])
    assert kept_positions(methods.early(tokens, torch.tensor([3]))) == [0, 3, 5, 6, 7]
    assert kept_positions(methods.late(tokens, torch.tensor([3]))) == [0, 1, 2, 3, 7]
    out = methods.late(tokens, torch.tensor([3]))
    assert torch.equal(out.hidden[0], tokens.hidden[0, [0, 1, 2, 3, 7]])  # pruned: values untouched


def test_strided_removes_evenly_spaced_movable_tokens():
    for m, r in [(10, 3), (10, 5), (10, 6), (7, 7), (9, 1), (12, 0)]:
        out = methods.strided(make_tokens(torch.randn(m, 2)), torch.tensor([r]))
        removed = out.plan.removed[0].nonzero().flatten().tolist()
        assert removed == sorted({math.floor(i * m / r) for i in range(r)}) and len(removed) == r
    assert methods.strided(make_tokens(torch.randn(10, 2)), torch.tensor([5])).plan.removed[0].tolist() == \
        [True, False] * 5
    # ranks count movable tokens only: protected 1 and padding 9 are skipped
    tokens = make_tokens(torch.randn(10, 2), protect=[False, True] + [False] * 8, valid=[True] * 9 + [False])
    assert methods.strided(tokens, torch.tensor([4])).plan.removed[0].nonzero().flatten().tolist() == [0, 3, 5, 7]


def test_early_merge_averages_the_earliest_into_the_next_kept_movable_token():
    torch.manual_seed(6)
    tokens = make_tokens(torch.randn(8, 3), protect=[False, False, False, True, False, False, False, False],
                         residual=torch.randn(8, 3))
    out = methods.early_merge(tokens, torch.tensor([3]))  # 0, 1, 2 go; 3 is protected: they merge into 4
    assert kept_positions(out) == [3, 4, 5, 6, 7]
    assert out.plan.target[0, :3].tolist() == [4, 4, 4]
    for stream in ("hidden", "residual"):
        assert torch.allclose(getattr(out, stream)[0, 1], getattr(tokens, stream)[0, [0, 1, 2, 4]].mean(0))
    assert out.residual_sizes[0].tolist() == [1, 4, 1, 1, 1]
    carried = make_tokens(tokens.hidden, sizes=[2.0, 1.0, 1.0, 1.0, 3.0, 1.0, 1.0, 1.0])
    out = methods.early_merge(carried, torch.tensor([2]), sizes="carry")
    assert torch.allclose(out.hidden[0, 0], (2 * carried.hidden[0, 0] + carried.hidden[0, 1]
                                              + carried.hidden[0, 2]) / 4)
    # no kept movable token left to receive them: pruned
    out = methods.early_merge(make_tokens(torch.randn(3, 2), protect=[False, False, True]), torch.tensor([2]))
    assert kept_positions(out) == [2] and not bool(out.plan.merge_hidden.any())


@pytest.mark.parametrize("name", ["early", "early_merge", "strided", "late"])
def test_positional_methods_are_batch_row_independent(name):
    torch.manual_seed(7)
    lengths = torch.tensor([17, 11, 4])
    valid = torch.arange(17) < lengths[:, None]
    protect = (torch.rand(3, 17) < 0.2) & valid
    batch = make_tokens(torch.randn(3, 17, 4), residual=torch.randn(3, 17, 4), valid=valid, protect=protect)
    n_remove = torch.tensor([6, 4, 3])
    out = method_call(name, batch, n_remove)
    for row, n in enumerate(lengths.tolist()):
        alone = method_call(name, make_tokens(batch.hidden[row, :n], residual=batch.residual[row, :n],
                                              protect=protect[row, :n]), n_remove[row:row + 1])
        kept = int(out.counts[row])
        assert out.source[row, :kept].tolist() == alone.source[0].tolist()
        assert torch.equal(out.residual[row, :kept], alone.residual[0])


# ------------------------------------------------------------------------------------------------ ceiling


@pytest.mark.parametrize("schedule", ["smooth", "chunk"])
def test_ceiling_keeps_exactly_the_budgets_counts_as_first_tokens(mamba2, schedule):
    model, info = mamba2
    reducer = reduction.from_config(model, compose("ceiling", 0.3, "benchmark=efficiency", f"schedule={schedule}"),
                                    info)
    setup = reducer.setup
    assert reducer.ceiling() is None and not setup.uses_importance
    assert not any(model.backbone.layers[i].mixer.out_proj._forward_pre_hooks for i in setup.layers)
    ids = torch.randint(1, 4000, (2, 100))
    out = reducer(ids, trace=True)
    reducer.remove()
    expected = reducer.chunk_counts(100) if schedule == "chunk" else \
        budget.predicted_counts(setup.rule, setup.keep_rate, 100, len(setup.layers), setup.min_keep_rate)
    assert schedule == "smooth" or all(c % 16 == 0 for c in expected)
    entering = 100
    for entry, count in zip(out.trace, expected):
        kept = entry["valid"] & (entry["hidden"] == patch.KEPT)
        assert bool((kept == (torch.arange(kept.shape[1]) < count)).all()), "the first slots"
        assert entry["position"][:, :count].tolist() == [list(range(count))] * 2, "a prefix of the sequence"
        assert entering >= count
        entering = count
    assert out.positions.tolist() == [list(range(expected[-1]))] * 2


@pytest.mark.parametrize("method", ["ours", "official", "evit"])
def test_ceiling_beside_a_method_runs_at_its_schedule(mamba2, method):
    model, info = mamba2
    reducer = reduction.from_config(model, compose(method, 0.3, "schedule=chunk"), info)
    ceiling = reducer.ceiling()
    a, b = reducer.setup, ceiling.setup
    assert (b.name, b.layers, b.keep_rate, b.rule, b.min_keep_rate, b.schedule, b.ratio) == \
        ("ceiling", a.layers, a.keep_rate, a.rule, a.min_keep_rate, a.schedule, a.ratio)
    ids = torch.randint(1, 4000, (2, 90))
    counts = [entry["valid"].sum(1).tolist() for entry in reducer(ids, trace=True).trace]
    ceiling_counts = [entry["valid"].sum(1).tolist() for entry in ceiling(ids, trace=True).trace]
    assert counts == ceiling_counts
    ceiling.remove()
    reducer.remove()
    assert not any(block._forward_hooks for block in model.backbone.layers)


# ------------------------------------------------------------------------------------------------ shared


def method_call(name, tokens, n_remove):
    entry = METHODS[name]
    return entry.function(tokens, n_remove, **{**reduction.method_defaults(name), **entry.fixed})


@pytest.mark.parametrize("name", REMOVING)
def test_shared_properties(name):
    torch.manual_seed(1)
    b, n = 4, 30
    valid = torch.arange(n) < torch.tensor([30, 25, 9, 2])[:, None]
    protect = (torch.rand(b, n) < 0.2) & valid
    tokens = make_tokens(torch.randn(b, n, 8), torch.rand(b, n), residual=torch.randn(b, n, 8), valid=valid,
                         protect=protect, sizes=torch.randint(1, 4, (b, n)).float())
    out = method_call(name, tokens, torch.tensor([10, 5, 3, 1]))
    plan = out.plan
    assert not bool((plan.removed & ~valid).any()), "padding is never removed as a token"
    assert not bool((plan.removed & protect).any()), "protected tokens are never removed"
    merged = plan.merge_hidden | plan.merge_residual
    assert not bool(protect.gather(1, plan.target)[merged].any()), "nothing is averaged into a protected token"
    assert not bool(plan.removed.gather(1, plan.target)[merged].any()), "merge targets are kept"
    assert out.counts.tolist() == (valid & ~plan.removed).sum(1).tolist()
    for row in range(b):
        real = out.source[row, : out.counts[row]]
        assert bool((real[1:] > real[:-1]).all()), "original order is kept"
        assert set(real.tolist()) == set((valid[row] & ~plan.removed[row]).nonzero().flatten().tolist())
    assert out.counts.tolist()[0] >= 20 and out.counts.tolist()[3] >= 1
    for stream in ("hidden", "residual"):  # kept tokens nothing was merged into are untouched, in both streams
        received = torch.zeros(b, n).scatter_add(1, plan.target, getattr(plan, f"merge_{stream}").float()) > 0
        untouched = valid & ~plan.removed & ~received
        before = getattr(tokens, stream)
        after = torch.zeros_like(before).scatter_(1, out.source[..., None].expand(-1, -1, 8), getattr(out, stream))
        assert torch.equal(after[untouched], before[untouched])


@pytest.mark.parametrize("name", ["tome", "merge_only", "pumer", "early_merge"])
def test_merging_conserves_the_size_weighted_sum(name):
    torch.manual_seed(2)
    b, n = 3, 21
    sizes = torch.randint(1, 5, (b, n)).float() if name == "tome" else torch.ones(b, n)
    tokens = make_tokens(torch.randn(b, n, 6), torch.rand(b, n), residual=torch.randn(b, n, 6), sizes=sizes)
    out = method_call(name, tokens, torch.tensor([8, 5, 2]))
    kept = torch.arange(out.source.shape[1]) < out.counts[:, None]
    merged_only = ~(out.plan.removed & ~out.plan.merge_residual)  # pruned tokens leave the sum
    before = (tokens.residual * (sizes * merged_only)[..., None]).sum(1)
    after = (out.residual * (out.residual_sizes * kept)[..., None]).sum(1)
    assert torch.allclose(before, after, atol=1e-5)
    assert torch.allclose((sizes * merged_only).sum(1), (out.residual_sizes * kept).sum(1))


def test_utr_early_decides_as_utr_among_the_earliest_movable_tokens():
    torch.manual_seed(5)
    hidden, importance = torch.randn(2, 20, 4), torch.rand(2, 20)
    protect = torch.zeros(2, 20, dtype=torch.bool)
    protect[1, 1] = True  # protected tokens are not candidates and do not take a window place
    tokens = make_tokens(hidden, importance, protect=protect)
    n_remove = torch.tensor([3, 4])
    out = methods.utr_early(tokens, n_remove, window=2.0)
    removed = out.plan.removed
    assert removed.sum(1).tolist() == [3, 4]
    for row, r in enumerate(n_remove.tolist()):
        window = tokens.movable[row].nonzero().flatten()[: 2 * r]
        assert set(removed[row].nonzero().flatten().tolist()) <= set(window.tolist())
        assert (out.plan.target[row][removed[row]] <= window.max()).all()  # merged within the window too
    # the same decision as UTR on a sequence that is the window alone
    for row, r in enumerate(n_remove.tolist()):
        window = tokens.movable[row].nonzero().flatten()[: 2 * r]
        alone = make_tokens(hidden[row, window], importance[row, window])
        expected = methods.utr(alone, torch.tensor([r])).plan.removed[0]
        assert removed[row, window].tolist() == expected.tolist()
    # a window over every movable token is UTR
    wide = methods.utr_early(tokens, n_remove, window=100.0)
    assert torch.equal(wide.hidden, methods.utr(tokens, n_remove).hidden)


def decimamba_side(model, layer: int, ids: torch.Tensor, kept: int, resp_len: int, delta_of) -> list[int]:
    """DeciMamba's own selection (tests/reduction/decimamba_reference.py) at `layer` of the dense model, keeping
    `kept` tokens besides the protected tail: its L_base with beta 1 and layer `layer` its first decimating layer."""
    from decimamba_reference import get_non_decimated_indices

    seen = {}
    mixer = model.backbone.layers[layer].mixer
    handle = mixer.register_forward_pre_hook(lambda module, args: seen.setdefault("input", args[0]))
    with torch.no_grad():
        model(ids)
    handle.remove()
    delta, bias = delta_of(mixer, seen["input"])
    config = dict(activate=True, type="max_p", beta=1.0, min_seq_len=min(20, kept), L_base=kept,
                  decimating_layers=[layer])
    return get_non_decimated_indices(delta, bias, resp_len, layer_num=layer, decimation_config=config).tolist()


@pytest.mark.parametrize("generation", [1, 2])
def test_decimamba_keeps_the_tokens_deciMambas_own_code_keeps(mamba1, mamba2, generation):
    """Same model, same input, same count: the positions DeciMamba's get_non_decimated_indices keeps (Mamba-1: its
    score from MambaInnerFn; Mamba-2: the same rule on the per-head Δ, as LongMamba's port of DeciMamba to Mamba-2),
    the protected last tokens as its response_length."""
    from decimamba_reference import mamba1_delta

    model, info = mamba1 if generation == 1 else mamba2
    layer, resp_len = 3, 2
    torch.manual_seed(generation)
    ids = torch.randint(0, info["vocab_size"], (1, 57))
    protect = torch.zeros_like(ids, dtype=torch.bool)
    protect[:, -resp_len:] = True
    reducer = reduction.from_config(model, compose("decimamba", 0.2, f"layers=[{layer}]"), info)
    try:
        with torch.no_grad():
            out = reducer(ids, protect=protect)
    finally:
        reducer.remove()
    ours = out.positions[0].tolist()
    assert 0 < len(ours) - resp_len < ids.shape[1] - resp_len  # tokens were removed at that layer

    def mamba2_delta(mixer, hidden):  # in_proj's dt columns, (1, nheads, L)
        return (hidden @ mixer.in_proj.weight.t())[..., -mixer.nheads:].transpose(1, 2)

    delta_of = ((lambda m, h: (mamba1_delta(m, h), m.dt_proj.bias)) if generation == 1 else
                (lambda m, h: (mamba2_delta(m, h), m.dt_bias)))
    assert ours == decimamba_side(model, layer, ids, len(ours) - resp_len, resp_len, delta_of)


def test_importance_delta_is_refused_where_no_ssm_delta_is_read():
    from conftest import compose_config
    from ssmcompress.hosts import transformers as hf

    jamba = hf.info_from_config(dict(model_type="jamba", vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                     attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
                                     expert_layer_offset=1, num_experts=1))
    with pytest.raises(ConfigError, match="importance=delta is not read on jamba models: it normalises dt"):
        reduction.resolve(compose_config(["method=decimamba", "ratio=0.3", "layers=[0]"]), jamba)
    hybrid = hf.info_from_config(dict(model_type="nemotron_h", vocab_size=64, hidden_size=32,
                                      hybrid_override_pattern="M*M", mamba_num_heads=2, mamba_head_dim=16, n_groups=1,
                                      ssm_state_size=8, num_attention_heads=2, num_key_value_heads=1, head_dim=16))
    with pytest.raises(ConfigError, match="importance=delta needs an SSM mixer at every reduction layer; layer 1"):
        reduction.resolve(compose_config(["method=decimamba", "ratio=0.3", "layers=[0,1]", "reduce_at=all"]), hybrid)
