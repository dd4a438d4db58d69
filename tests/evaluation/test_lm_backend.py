"""The reduction-aware lm-eval backend: scores read at the right positions (exact), the official alignment (paper)."""
import pytest
import torch
import torch.nn.functional as F

from conftest import TOKENIZER_DIR, tiny_model
from evaluation.fake_reducer import DropTokens
from ssmcompress import models
from ssmcompress.hosts import mamba_ssm
from ssmcompress.evaluation.lm_backend import ReducedMambaLM, lengths_and_protection, scored_rows


@pytest.fixture(scope="module")
def tokenizer():
    return models.load_tokenizer(str(TOKENIZER_DIR))


@pytest.fixture(scope="module")
def model():
    return tiny_model(2, seed=1)


def make_requests(seed=0, n=10):
    """(request, context ids, continuation ids) with varied lengths, shared contexts and one-token continuations."""
    generator = torch.Generator().manual_seed(seed)
    requests = []
    for i in range(n):
        context = torch.randint(1, 4000, (int(torch.randint(8, 30, (1,), generator=generator)),),
                                generator=generator).tolist()
        for cont_len in (1, 1, 3) if i % 3 == 0 else (int(torch.randint(1, 5, (1,), generator=generator)),):
            continuation = torch.randint(1, 4000, (cont_len,), generator=generator).tolist()
            requests.append(((f"c{i}", f"t{len(requests)}"), context, continuation))
    return requests


def score(model, tokenizer, requests, reducer=None, protocol="exact", batch_size=4):
    lm = ReducedMambaLM(model, tokenizer, reducer=reducer, protocol=protocol, batch_size=batch_size)
    return lm._loglikelihood_tokens(requests, disable_tqdm=True), lm


def assert_same_scores(actual, expected, atol=1e-4):
    assert len(actual) == len(expected)
    for (ll, greedy), (ll_ref, greedy_ref) in zip(actual, expected):
        assert ll == pytest.approx(ll_ref, abs=atol, rel=1e-5)
        assert greedy == greedy_ref


def test_exact_protocol_equals_dense_when_nothing_is_reduced(model, tokenizer):
    requests = make_requests()
    dense, _ = score(model, tokenizer, requests)
    reducer = DropTokens(model, layer=1, count=0)
    assert_same_scores(score(model, tokenizer, requests, reducer)[0], dense)
    assert reducer.calls > 0


def test_exact_protocol_reads_kept_positions_where_they_were(model, tokenizer):
    # removing tokens after the last block changes no kept position's logits, only the layout lm-eval receives:
    # scores must equal the dense ones exactly where the scattering is right
    requests = make_requests(seed=1)
    dense, _ = score(model, tokenizer, requests)
    reduced, _ = score(model, tokenizer, requests, DropTokens(model, layer=model.config.n_layer - 1, count=3))
    assert_same_scores(reduced, dense)


def test_exact_protocol_padded_batches_score_as_batch_size_one(model, tokenizer):
    requests = make_requests(seed=2)
    reducer = DropTokens(model, layer=0, count=3)
    single, _ = score(model, tokenizer, requests, reducer, batch_size=1)
    batched, _ = score(model, tokenizer, requests, reducer, batch_size=8)
    assert_same_scores(batched, single)
    dense, _ = score(model, tokenizer, requests)
    assert any(abs(a[0] - b[0]) > 1e-3 for a, b in zip(single, dense))  # the reduction did change the model


def test_exact_protocol_refuses_a_reducer_that_drops_a_scored_position(model, tokenizer):
    reducer = DropTokens(model, layer=0, count=2)

    def ignores_protection(input_ids, lengths=None, protect=None):
        return reducer(input_ids, lengths, None)

    requests = [(("a", "b"), [11, 12], [13, 14, 15])]  # scored positions 1..3 of a 4-token row
    with pytest.raises(RuntimeError, match="removed protected position"):
        score(model, tokenizer, requests, ignores_protection)


def official_scores(model, reducer, batch):
    """What the official ToR_SSM evaluation computes for one right-padded batch of (context, continuation)."""
    rows = [(ctx + cont)[:-1] for ctx, cont in batch]
    padded_len = max(len(r) for r in rows)
    inps = torch.tensor([r + [0] * (padded_len - len(r)) for r in rows])
    with torch.no_grad():
        logits = F.log_softmax(reducer(inps).logits.float(), dim=-1)
    out = []
    for (ctx, cont), row, row_logits in zip(batch, rows, logits):
        ctx_len = len(row) + (row_logits.shape[0] - padded_len)
        picked = row_logits[ctx_len - len(cont): ctx_len]
        out.append((float(picked.gather(1, torch.tensor(cont)[:, None]).sum()),
                    bool((picked.argmax(-1) == torch.tensor(cont)).all())))
    return out


def test_paper_protocol_reproduces_the_official_alignment(model, tokenizer):
    reducer = DropTokens(model, layer=1, count=4)
    long, short = ([5] * 3 + list(range(100, 117)), [7, 8, 9]), (list(range(200, 214)), [21, 22])
    requests = [(("l", "l"), *long), (("s", "s"), *short)]
    results, lm = score(model, tokenizer, requests, reducer, protocol="paper", batch_size=2)
    assert_same_scores(results, official_scores(model, reducer, [long, short]), atol=1e-5)
    assert lm.clamped_rows == 0


def test_paper_protocol_reads_from_position_zero_where_the_official_slice_was_negative(model, tokenizer):
    reducer = DropTokens(model, layer=0, count=6)
    long, short = (list(range(100, 120)), [7]), ([30, 31], [40, 41])
    requests = [(("l", "l"), *long), (("s", "s"), *short)]
    results, lm = score(model, tokenizer, requests, reducer, protocol="paper", batch_size=2)
    assert lm.clamped_rows == 1
    inps = torch.tensor([(long[0] + long[1])[:-1], [30, 31, 40] + [0] * 17])
    with torch.no_grad():
        logits = F.log_softmax(reducer(inps).logits[1].float(), dim=-1)[:2]  # the short row's first two positions
    assert results[1][0] == pytest.approx(float(logits[0, 40] + logits[1, 41]), abs=1e-5)


def test_padded_rows_ending_in_the_pad_id_protect_every_candidate():
    # inputs [5, 6, 0] (2 positions scored) and [5, 6] (2 scored) look alike once right-padded with 0
    scored = scored_rows([(None, [5, 6], [0, 9]), (None, [5], [6, 8]), (None, [1, 2, 3], [4])], max_length=2048)
    lengths, protect = lengths_and_protection(torch.tensor([[5, 6, 0, 0, 0], [1, 2, 3, 0, 0]]), scored)
    assert lengths.tolist() == [3, 3]
    assert protect.tolist() == [[True, True, True, False, False], [False, False, True, False, False]]
    with pytest.raises(RuntimeError, match="did not see"):
        lengths_and_protection(torch.tensor([[9, 9, 0]]), scored)


def test_generate_until_drops_lm_evals_left_padding_and_is_batch_invariant(model, tokenizer):
    """lm-eval left-pads a generation batch; each prompt must generate as it does alone (dense and reduced)."""
    from conftest import compose_config
    from ssmcompress import generation, reduction

    cfg = compose_config(["model.random_init=true", "method=ours", "ratio=0.3", "layers=[1,2]"])
    reducer = reduction.from_config(model, cfg, mamba_ssm.model_info(model))
    try:
        for active in (None, reducer):
            lm = ReducedMambaLM(model, tokenizer, reducer=active, batch_size=4)
            prompts = [torch.randint(1, 4000, (n,)).tolist() for n in (12, 20, 16)]
            width = max(map(len, prompts))
            context = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
            out = lm._model_generate(context, width + 3, None, attention_mask=mask, do_sample=False)
            assert out.shape == (3, width + 3) and torch.equal(out[:, :width], context)
            alone = [generation.generate_each(model, [p], 3, reducer=active, eos_token_id=lm.eot_token_id)[0]
                     for p in prompts]
            for row, tokens in zip(out[:, width:].tolist(), alone):
                assert row[:len(tokens)] == tokens and set(row[len(tokens):]) <= {lm.eot_token_id}
    finally:
        reducer.remove()


def test_unknown_protocol_is_an_error(model, tokenizer):
    with pytest.raises(ValueError, match="unknown protocol"):
        ReducedMambaLM(model, tokenizer, protocol="fuzzy")


def test_filler_slots_never_stand_in_for_real_positions():
    from ssmcompress.evaluation.lm_backend import scatter_to_positions

    logits = torch.arange(4.0).reshape(1, 4, 1)
    protect = torch.tensor([[False, False, False, True]])
    # three real slots (positions 0, 2, 3) and a filler parked on removed position 1
    full = scatter_to_positions(logits, torch.tensor([[0, 2, 3, 1]]), protect, counts=torch.tensor([3]))
    assert full[0, :, 0].tolist()[0] == 0 and full[0, 2, 0] == 1 and full[0, 3, 0] == 2
    assert torch.isnan(full[0, 1, 0])
    with pytest.raises(RuntimeError, match="protected position 3"):  # a filler on a protected position is no keep
        scatter_to_positions(logits, torch.tensor([[0, 1, 2, 3]]), protect, counts=torch.tensor([3]))
