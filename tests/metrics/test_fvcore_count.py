"""fvcore counts of tiny models equal the analytic model, on the CPU path and on the GPU kernels' path (simulated)."""
import math

import mamba_ssm.modules.mamba_simple as m1
import mamba_ssm.ops.selective_scan_interface as ssi
import mamba_ssm.ops.triton.layer_norm as ln
import mamba_ssm.ops.triton.layernorm_gated as lng
import mamba_ssm.ops.triton.ssd_combined as ssd
import pytest
import torch
from mamba_ssm.models.config_mamba import MambaConfig
from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

from conftest import TINY, tiny_model
from evaluation.fake_reducer import DropTokens
from ssmcompress import compat
from ssmcompress import flops
from ssmcompress.hosts import mamba_ssm
from ssmcompress.metrics import fvcore_count
from ssmcompress.metrics.forwards import dense_forward, reduced_forward, tokens_per_layer

# the references as they are outside any count (kernels_as_ops swaps the module attributes while counting)
CHUNK_SCAN_REF, ADD_NORM_REF, GATED_NORM_REF = compat.chunk_scan_reference, compat.add_norm_reference, lng.rms_norm_ref


def count(model, input_ids, forward=None):
    info = mamba_ssm.model_info(model)
    return fvcore_count.count_forward(model, forward or dense_forward(model), input_ids, info), info


def ids(batch=2, length=40, seed=0):
    return torch.randint(1, 4000, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("generation", [2, 1, 3])
def test_cpu_count_equals_the_analytic_model(generation):
    model = tiny_model(generation)
    counted, info = count(model, ids())
    expected = flops.forward_flops(info, [40] * info["n_layer"])
    assert counted["total"] / 2 == pytest.approx(expected["total"], rel=0.02)
    for layer, analytic in zip(counted["per_layer"], expected["per_layer"]):
        assert layer / 2 == pytest.approx(analytic, rel=0.02)
    assert counted["lm_head"] / 2 == pytest.approx(expected["lm_head"])
    # the scan is one op per layer, counted exactly by the analytic formula; norms likewise
    scan_op = {1: "PythonOp.SelectiveScanFn", 2: "PythonOp.MambaChunkScanCombinedFn",
               3: "PythonOp._Mamba3Function"}[generation]
    scan = flops.mixer_flops_per_token(info, 40)["scan"] * 40 * info["n_layer"]
    assert counted["by_operator"][scan_op] / 2 == pytest.approx(scan)
    norms = flops.mixer_flops_per_token(info, 40)["norm"] * 40 * info["n_layer"] + expected["final_norm"]
    assert counted["by_operator"]["PythonOp.LayerNormFn"] / 2 == pytest.approx(norms)
    assert not any("einsum" in op for op in counted["by_operator"])  # the reference's einsums stay inside


@pytest.mark.parametrize("outproj_norm", [False, True])
def test_a_mimo_models_count_equals_the_analytic_model(outproj_norm):
    """Mamba-3 MIMO: the scan (mamba-ssm's MIMO Function, with the ranks' weighted sum where it takes MIMO_Out) as
    the analytic model's; with the output norm the module sums the ranks in an einsum of its own, which fvcore counts,
    and gates each rank's output in another, which it counts at half a multiply-add per element (within the 2 %)."""
    cfg = dict(TINY[3]["ssm_cfg"], is_mimo=True, mimo_rank=2, chunk_size=8, is_outproj_norm=outproj_norm)
    model = tiny_model(3, ssm_cfg=cfg)
    counted, info = count(model, ids())
    expected = flops.forward_flops(info, [40] * info["n_layer"])
    assert counted["total"] / 2 == pytest.approx(expected["total"], rel=0.02)
    for layer, analytic in zip(counted["per_layer"], expected["per_layer"]):
        assert layer / 2 == pytest.approx(analytic, rel=0.02)
    parts = flops.mixer_flops_per_token(info, 40)
    kernel = parts["scan"] + (0 if outproj_norm else parts["mimo_out"])
    assert counted["by_operator"]["PythonOp._Mamba3Function"] / 2 == pytest.approx(kernel * 40 * info["n_layer"])
    norms = parts["norm"] * 40 * info["n_layer"] + expected["final_norm"]
    assert counted["by_operator"]["PythonOp.LayerNormFn"] / 2 == pytest.approx(norms)


def test_counting_leaves_the_model_and_the_references_unchanged():
    model, input_ids = tiny_model(2), ids()
    with torch.no_grad():
        before = model(input_ids).logits
        count(model, input_ids)
        after = model(input_ids).logits
    assert torch.equal(before, after)
    assert (compat.chunk_scan_reference, compat.add_norm_reference, lng.rms_norm_ref) == \
        (CHUNK_SCAN_REF, ADD_NORM_REF, GATED_NORM_REF)


@pytest.fixture
def triton_functions(monkeypatch):
    """The GPU path, on a CPU: compat routes every Mamba-2 kernel call to mamba-ssm's own entry points (as it does
    for CUDA tensors), whose autograd Functions (`MambaChunkScanCombinedFn`, both `LayerNormFn`) compute with the
    references. The trace then holds mamba-ssm's real Function nodes with their real argument layouts."""
    monkeypatch.setattr(compat, "_triton_runs_on", lambda x: True)
    calls = {"chunk_scan": 0}

    def chunk_scan(ctx, x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
                   seq_idx=None, cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, float("inf")),
                   return_final_states=False, return_varlen_states=False):
        calls["chunk_scan"] += 1
        return CHUNK_SCAN_REF(x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus,
                              dt_limit=dt_limit)

    def add_norm(ctx, x, weight, bias, residual=None, x1=None, weight1=None, bias1=None, eps=1e-6, dropout_p=0.0,
                 rowscale=None, prenorm=False, residual_in_fp32=False, is_rms_norm=False, return_dropout_mask=False):
        return ADD_NORM_REF(x, weight, bias, residual, eps, prenorm, residual_in_fp32, is_rms_norm,
                            ln.rms_norm_ref, ln.layer_norm_ref)

    def gated_norm(ctx, x, weight, bias, z=None, eps=1e-6, group_size=None, norm_before_gate=True,
                   is_rms_norm=False):
        return GATED_NORM_REF(x, weight, bias, z=z, eps=eps, group_size=group_size,
                              norm_before_gate=norm_before_gate, upcast=True)

    monkeypatch.setattr(ssd.MambaChunkScanCombinedFn, "forward", staticmethod(chunk_scan))
    monkeypatch.setattr(ln.LayerNormFn, "forward", staticmethod(add_norm))
    monkeypatch.setattr(lng.LayerNormFn, "forward", staticmethod(gated_norm))
    return calls


def test_gpu_kernel_path_counts_like_the_cpu_path(triton_functions):
    # Triton kernels cannot run under torch.jit.trace (seen on an H200: "arange's arguments must be of type
    # tl.constexpr"), so counting routes the GPU path to the references, and restores the route afterwards
    model, input_ids = tiny_model(2), ids()
    gpu_path, _ = count(model, input_ids)
    assert triton_functions["chunk_scan"] == 0  # the kernels' Functions did not run while tracing
    with torch.no_grad():
        model(input_ids)
    assert triton_functions["chunk_scan"] == model.config.n_layer  # ... and run again after it
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(compat, "_triton_runs_on", lambda x: False)
        cpu_path, _ = count(model, input_ids)
    assert gpu_path["total"] == cpu_path["total"]
    assert gpu_path["per_layer"] == cpu_path["per_layer"]
    assert gpu_path["by_operator"] == cpu_path["by_operator"]


def test_fused_mamba2_kernel_is_counted_as_its_parts(monkeypatch):
    config = {**TINY[2], "ssm_cfg": {**TINY[2]["ssm_cfg"], "use_mem_eff_path": True}}
    torch.manual_seed(0)
    model = MambaLMHeadModel(MambaConfig(**config)).eval()
    assert model.backbone.layers[0].mixer.use_mem_eff_path

    def fused(ctx, zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size, initial_states=None, seq_idx=None,
              dt_limit=(0.0, float("inf")), return_final_states=False, activation="silu", rmsnorm_weight=None,
              rmsnorm_eps=1e-6, outproj_weight=None, outproj_bias=None, headdim=None, ngroups=1,
              norm_before_gate=True):
        return zxbcdt.new_zeros(*zxbcdt.shape[:2], outproj_weight.shape[0])  # shape only: numbers do not matter

    monkeypatch.setattr(ssd.MambaSplitConv1dScanCombinedFn, "forward", staticmethod(fused))
    counted, info = count(model, ids())
    assert counted["by_operator"]["PythonOp.MambaSplitConv1dScanCombinedFn"] > 0
    assert counted["total"] / 2 == pytest.approx(flops.dense_flops(info, 40), rel=1e-9)


def test_fused_mamba1_kernel_is_counted_as_its_parts(monkeypatch):
    model = tiny_model(1)
    for layer in model.backbone.layers:  # built without the compiled kernels, so with the fused path off
        monkeypatch.setattr(layer.mixer, "use_fast_path", True)

    def fused(ctx, xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight,
              out_proj_bias, A, B=None, C=None, D=None, delta_bias=None, B_proj_bias=None, C_proj_bias=None,
              delta_softplus=True, checkpoint_lvl=1, b_rms_weight=None, c_rms_weight=None, dt_rms_weight=None,
              b_c_dt_rms_eps=1e-6):
        return xz.new_zeros(xz.shape[0], xz.shape[2], out_proj_weight.shape[0])

    monkeypatch.setattr(m1, "causal_conv1d_fn", object())  # what makes mamba-ssm take the fused path
    monkeypatch.setattr(ssi.MambaInnerFn, "forward", staticmethod(fused))
    counted, info = count(model, ids())
    assert counted["by_operator"]["PythonOp.MambaInnerFn"] > 0
    assert counted["total"] / 2 == pytest.approx(flops.dense_flops(info, 40), rel=1e-9)


def test_selective_scan_kernel_handle_reads_the_kernels_argument_layout(monkeypatch):
    # mamba-ssm's own entry point and Function (as on a GPU with the CUDA extension), computed by the reference
    monkeypatch.setattr(ssi.SelectiveScanFn, "forward", staticmethod(
        lambda ctx, u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
        return_last_state=False: ssi.selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus)))
    batch, d_inner, d_state, length = 2, 24, 8, 10

    class Scan(torch.nn.Module):
        def forward(self, u):
            A = -torch.ones(d_inner, d_state)
            B = C = torch.ones(batch, d_state, length)
            return ssi.selective_scan_fn(u, u, A, B, C, torch.ones(d_inner), z=u, delta_softplus=True)

    from fvcore.nn import FlopCountAnalysis

    analysis = FlopCountAnalysis(Scan(), (torch.rand(batch, d_inner, length),))
    analysis.set_op_handle(**fvcore_count.handles(dict(d_model=1, d_inner=1, n_layer=1)))
    assert analysis.total() == batch * length * flops.selective_scan_flops_per_token(d_inner, d_state)


def test_reduced_forward_counts_as_the_analytic_model_with_the_matching_cost():
    model, input_ids = tiny_model(2), ids(length=48)
    reducer = DropTokens(model, layer=1, count=10, match=True)
    tokens, logits_tokens = tokens_per_layer(model, reduced_forward(reducer), input_ids)
    assert tokens == [48, 48, 38, 38] and logits_tokens == 38
    counted, info = count(model, input_ids, reduced_forward(reducer))
    matching = reducer.reduction_flops(tokens)
    assert matching == 24 * 24 * 64
    expected = flops.forward_flops(info, tokens, logits_tokens, extra=matching)
    assert counted["total"] / 2 == pytest.approx(expected["total"], rel=0.02)
    dense, _ = count(model, input_ids)
    # the layers after the reduction show it, the ones before do not
    assert counted["per_layer"][:2] == dense["per_layer"][:2]
    assert all(r < d for r, d in zip(counted["per_layer"][2:], dense["per_layer"][2:]))
    assert math.isclose(counted["per_layer"][3] / dense["per_layer"][3],
                        flops.layer_flops(info, 3, 38) / flops.layer_flops(info, 3, 48), rel_tol=0.02)
