"""The Triton causal conv (run here by Triton's interpreter) against the computation Mamba layers do without
causal-conv1d: torch's conv1d, then SiLU."""
import pytest
import torch

from ssmcompress import causal_conv


def layouts(batch, dim, length, dtype):
    """The same values as a contiguous (batch, dim, length) tensor and as the models pass them, a transposed
    (batch, length, dim) one."""
    values = torch.randn(batch, length, dim).to(dtype)
    return values.transpose(1, 2).contiguous(), values.transpose(1, 2)


@pytest.mark.parametrize("width", [2, 4])
@pytest.mark.parametrize("length", [1, 3, 37])
def test_the_kernel_equals_torchs_conv_in_float32_for_every_layout_width_and_length(width, length):
    torch.manual_seed(length * width)
    weight, bias = torch.randn(13, width), torch.randn(13)
    for x in layouts(2, 13, length, torch.float32):
        for b in (bias, None):
            for activation in (None, "silu", "swish"):
                out = causal_conv.causal_conv1d_fn(x, weight, b, activation)
                expected = causal_conv.causal_conv1d_reference(x, weight, b, activation)
                torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
                assert out.stride() == x.stride()  # a transposed input gives a transposed output


def test_in_bfloat16_the_kernel_rounds_the_float32_result_once():
    torch.manual_seed(0)
    weight, bias = torch.randn(24, 4).bfloat16(), torch.randn(24).bfloat16()
    _, x = layouts(3, 24, 50, torch.bfloat16)
    out = causal_conv.causal_conv1d_fn(x, weight, bias, "silu")
    exact = causal_conv.causal_conv1d_reference(x.float(), weight.float(), bias.float(), "silu")
    assert out.dtype == torch.bfloat16
    # one rounding of the float32 result: Triton's interpreter converts to bfloat16 by truncation (a GPU rounds to
    # nearest), so here the output is the float32 result cut to bfloat16's 8 bits, exactly
    cut = (exact.view(torch.int32) & ~0xFFFF).view(torch.float32)
    assert torch.equal(out.float(), cut)


def test_the_output_is_causal():
    x, weight = torch.randn(1, 5, 30), torch.randn(5, 4)
    changed = x.clone()
    changed[..., 20:] += 1.0
    out, out_changed = (causal_conv.causal_conv1d_fn(t, weight, None, "silu") for t in (x, changed))
    assert torch.equal(out[..., :20], out_changed[..., :20]) and not torch.equal(out[..., 20:], out_changed[..., 20:])


def test_what_the_kernel_does_not_do_is_refused():
    x, weight = torch.randn(1, 4, 6), torch.randn(4, 4)
    with pytest.raises(NotImplementedError, match="seq_idx"):
        causal_conv.causal_conv1d_fn(x, weight, seq_idx=torch.zeros(1, 6, dtype=torch.int32))
    with pytest.raises(ValueError, match="activation"):
        causal_conv.causal_conv1d_fn(x, weight, activation="gelu")
    with pytest.raises(ValueError, match="weight"):
        causal_conv.causal_conv1d_fn(x, torch.randn(5, 4))
