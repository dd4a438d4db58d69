"""The analytic FLOPs model: structure and the properties the reduction budget relies on."""
import pytest

from conftest import tiny_model
from ssmcompress.hosts import mamba_ssm
from ssmcompress import flops


@pytest.fixture(scope="module", params=[2, 1], ids=["mamba2", "mamba1"])
def info(request):
    return mamba_ssm.model_info(tiny_model(request.param))


def test_forward_total_is_the_sum_of_its_parts(info):
    tokens = [40, 40, 30, 20]
    out = flops.forward_flops(info, tokens, logits_tokens=5, extra=123.0)
    assert out["total"] == pytest.approx(sum(out["per_layer"]) + out["final_norm"] + out["lm_head"] + 123.0)
    assert out["lm_head"] == info["d_model"] * info["vocab_size"] * 5
    assert out["final_norm"] == flops.NORM_FLOPS_PER_ELEMENT * info["d_model"] * 20  # tokens leaving the last block
    assert out["per_layer"] == [flops.layer_flops(info, i, t) for i, t in enumerate(tokens)]


def test_removing_tokens_at_a_layer_lowers_exactly_the_later_layers(info):
    dense = flops.forward_flops(info, [64] * 4)
    reduced = flops.forward_flops(info, [64, 64, 32, 32])
    assert reduced["per_layer"][:2] == dense["per_layer"][:2]
    assert all(r < d for r, d in zip(reduced["per_layer"][2:], dense["per_layer"][2:]))
    assert flops.dense_flops(info, 64) == dense["total"]


def test_cost_per_token_is_constant_beyond_one_scan_chunk(info):
    # Mamba-2's SSD costs grow with the chunk only up to chunk_size; Mamba-1 is linear from the first token
    chunk = info.get("chunk_size", 1)
    per_token = [flops.layer_flops(info, 0, n) / n for n in (chunk, 2 * chunk, 8 * chunk)]
    assert per_token[0] == pytest.approx(per_token[1]) == pytest.approx(per_token[2])
    if info["mamba_version"] == 2:
        assert flops.layer_flops(info, 0, chunk // 2) / (chunk // 2) < per_token[0]


def test_mamba2_components_follow_mamba_ssm_shapes():
    model = tiny_model(2)
    info = mamba_ssm.model_info(model)
    mixer = model.backbone.layers[0].mixer
    parts = flops.mixer_flops_per_token(info, 64)
    assert parts["in_proj"] == mixer.in_proj.weight.numel()
    assert parts["out_proj"] == mixer.out_proj.weight.numel()
    assert parts["conv"] == mixer.conv1d.weight.numel()


def test_matching_cost_is_the_similarity_between_alternating_halves():
    assert flops.bipartite_matching_flops(5, 2) == 3 * 2 * 2
    assert flops.bipartite_matching_flops(4, 8) == 2 * 2 * 8


def test_wrong_number_of_layers_is_an_error(info):
    with pytest.raises(ValueError, match="need 4 token counts"):
        flops.forward_flops(info, [10, 10])
