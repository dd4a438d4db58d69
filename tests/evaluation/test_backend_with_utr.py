"""The backend with a real reduction method (UTR, `method=ours`), not only the test reducer."""
import pytest

from conftest import compose_config, tiny_model
from ssmcompress import models, reduction
from ssmcompress.hosts import mamba_ssm
from test_lm_backend import assert_same_scores, make_requests, score


@pytest.fixture(scope="module")
def model():
    return tiny_model(2, seed=1)


@pytest.fixture(scope="module")
def tokenizer():
    from conftest import TOKENIZER_DIR

    return models.load_tokenizer(str(TOKENIZER_DIR))


def utr(model, *overrides):
    return reduction.from_config(model, compose_config(["method=ours", "ratio=0.3", *overrides]),
                                 mamba_ssm.model_info(model))


def test_exact_protocol_with_utr_equals_dense_when_it_reduces_nothing(model, tokenizer):
    requests = make_requests(seed=3)
    dense, _ = score(model, tokenizer, requests)
    control = utr(model, "layers=[]")  # no reduction layer: UTR's own control
    try:
        assert_same_scores(score(model, tokenizer, requests, control)[0], dense)
    finally:
        control.remove()


def test_exact_protocol_with_utr_is_batch_invariant(model, tokenizer):
    requests = make_requests(seed=4)
    reducer = utr(model)
    try:
        single, _ = score(model, tokenizer, requests, reducer, batch_size=1)
        batched, _ = score(model, tokenizer, requests, reducer, batch_size=8)
        assert reducer.describe()["observed"]["achieved_ratio"] > 0.05  # it did reduce
    finally:
        reducer.remove()
    assert_same_scores(batched, single)
