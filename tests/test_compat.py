"""The compatibility layer: mamba-ssm imports and runs on a CPU, and our scan paths agree with its references."""
import contextlib
import importlib
import inspect

import pytest
import torch

from ssmcompress import compat
from ssmcompress.config import ConfigError
from reference import reference_logits
from conftest import tiny_model


def test_cpu_forward_equals_straightforward_reference_both_generations():
    for generation in (2, 1):
        model = tiny_model(generation)
        ids = torch.randint(0, 4096, (2, 37))  # not a multiple of the chunk size
        with torch.no_grad():
            logits = model(ids).logits
        reference = reference_logits(model, ids)
        assert torch.allclose(logits, reference, atol=2e-4, rtol=1e-4), (generation, (logits - reference).abs().max())


def test_cpu_forward_is_causal():
    for generation in (2, 1):
        model = tiny_model(generation)
        ids = torch.randint(0, 4096, (2, 40))
        changed = ids.clone()
        changed[:, 25:] = torch.randint(0, 4096, (2, 15))
        with torch.no_grad():
            a, b = model(ids).logits, model(changed).logits
        assert torch.equal(a[:, :25], b[:, :25])
        assert not torch.allclose(a[:, 25:], b[:, 25:])


def test_parallel_scan_matches_mamba_ssm_reference():
    from mamba_ssm.ops.selective_scan_interface import selective_scan_ref

    b, d, n, length = 2, 16, 8, 45
    u, delta, z = torch.randn(b, d, length), torch.randn(b, d, length), torch.randn(b, d, length)
    A, B, C = -torch.rand(d, n) * 4, torch.randn(b, n, length), torch.randn(b, n, length)
    D, bias = torch.randn(d), torch.randn(d)
    expected = selective_scan_ref(u, delta, A, B, C, D, z=z, delta_bias=bias, delta_softplus=True)
    got = compat.selective_scan_parallel(u, delta, A, B, C, D, z=z, delta_bias=bias, delta_softplus=True)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4)


def test_chunk_scan_reference_matches_mamba_ssm_and_has_finite_gradients():
    import torch.nn.functional as F
    from mamba_ssm.ops.triton.ssd_combined import ssd_chunk_scan_combined_ref

    b, length, h, p, n, chunk = 2, 40, 4, 8, 16, 16
    x = torch.randn(b, length, h, p, requires_grad=True)
    dt = torch.randn(b, length, h, requires_grad=True)
    A, D, bias = -torch.rand(h) * 3, torch.randn(h), torch.randn(h)
    B, C = torch.randn(b, length, 2, n), torch.randn(b, length, 2, n)
    pad = (-length) % chunk
    expected = ssd_chunk_scan_combined_ref(F.pad(x, (0, 0, 0, 0, 0, pad)), F.pad(dt, (0, 0, 0, pad)), A,
                                           F.pad(B, (0, 0, 0, 0, 0, pad)), F.pad(C, (0, 0, 0, 0, 0, pad)), chunk,
                                           D=D, dt_bias=bias, dt_softplus=True)[:, :length]
    got = compat.chunk_scan_reference(x, dt, A, B, C, chunk, D=D, dt_bias=bias, dt_softplus=True)
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)
    got.square().sum().backward()
    assert torch.isfinite(dt.grad).all() and torch.isfinite(x.grad).all()


def test_mamba1_scan_routes_by_device_and_setting(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # routing only: nothing runs on the GPU
    monkeypatch.setattr(compat, "HAS_SELECTIVE_SCAN_CUDA", False)
    for setting, on_cpu, on_gpu in [("auto", "ref", "triton"), ("triton", "ref", "triton"), ("ref", "ref", "ref"),
                                    ("parallel", "parallel", "parallel")]:
        monkeypatch.setattr(compat, "MAMBA1_SCAN", setting)
        assert (compat.mamba1_scan(cpu), compat.mamba1_scan(cuda)) == (on_cpu, on_gpu), setting
    monkeypatch.setattr(compat, "MAMBA1_SCAN", "auto")
    with compat.reference_kernels():  # FLOP counting traces the GPU path on the references
        assert compat.mamba1_scan(cuda) == "ref"
    monkeypatch.setattr(compat, "MAMBA1_SCAN", "cuda")
    with pytest.raises(ConfigError, match="selective_scan_cuda"):
        compat.mamba1_scan(cuda)
    monkeypatch.setattr(compat, "HAS_SELECTIVE_SCAN_CUDA", True)
    assert compat.mamba1_scan(cuda) == "cuda" and compat.mamba1_scan(cpu) == "ref"
    for setting, on_gpu in [("auto", "cuda"), ("triton", "triton")]:
        monkeypatch.setattr(compat, "MAMBA1_SCAN", setting)
        assert compat.mamba1_scan(cuda) == on_gpu
    monkeypatch.setattr(compat, "MAMBA1_SCAN", "fast")
    with pytest.raises(ConfigError, match="auto, cuda, triton, ref, parallel"):
        compat.mamba1_scan(cpu)


def test_attention_from_a_cache_sees_every_cached_key():
    # torch aligns is_causal to the first key; decoding (fewer queries than keys) needs it aligned to the last
    q, k, v = (torch.randn(1, 2, n, 8) for n in (3, 7, 7))
    out = compat.decoding_attention(q, k, v, is_causal=True)
    mask = torch.ones(7, 7, dtype=torch.bool).tril()[4:]
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    single = compat.decoding_attention(q[:, :, -1:], k, v, is_causal=True)
    torch.testing.assert_close(single, torch.nn.functional.scaled_dot_product_attention(q[:, :, -1:], k, v))
    square = torch.randn(1, 2, 7, 8)
    assert torch.equal(compat.decoding_attention(square, k, v, is_causal=True),
                       torch.nn.functional.scaled_dot_product_attention(square, k, v, is_causal=True))


def test_transformers_kernels_run_mamba_ssms_on_cuda_whatever_transformers_resolved_at_import():
    import mamba_ssm.ops.triton.selective_state_update as state_update
    import mamba_ssm.ops.triton.ssd_combined as ssd
    import transformers.models.nemotron_h.modeling_nemotron_h as module

    compat.route_transformers(module)
    compat.route_transformers(module)  # idempotent
    scan, scan_pure = compat.transformers_kernel(module, "mamba2_chunk_scan")
    assert scan is ssd.mamba_chunk_scan_combined and scan_pure is not scan
    assert compat.transformers_kernel(module, "mamba2_selective_state_update")[0] is state_update.selective_state_update
    conv, conv_pure = compat.transformers_kernel(module, "causal_conv1d_fn")  # no causal-conv1d here: ours
    assert conv.__module__ == "ssmcompress.causal_conv" and conv is not conv_pure
    assert compat.transformers_kernel(module, "no_such_kernel") is None
    x, weight, bias = torch.randn(1, 6, 5), torch.randn(6, 4), torch.randn(6)
    # CPU tensors take transformers' own function; the kernel (run here by Triton's interpreter) computes the same
    assert torch.equal(module.causal_conv1d_fn(x, weight), conv_pure(x, weight))
    for activation in (None, "silu"):
        expected = conv_pure(x, weight, bias, activation=activation)
        torch.testing.assert_close(conv(x, weight, bias, activation=activation, seq_idx=None), expected)
    gelu = conv_pure(x, weight, bias, activation="gelu")  # an activation the kernel lacks: transformers' own conv
    assert torch.equal(conv(x, weight, bias, activation="gelu"), gelu)


def test_mamba_ssm_modules_run_the_causal_conv_through_the_router_and_compute_what_they_did_without_it():
    import mamba_ssm.modules.mamba2 as m2
    import mamba_ssm.modules.mamba_simple as m1

    assert m1.causal_conv1d_fn is compat.causal_conv1d and m2.causal_conv1d_fn is compat.causal_conv1d
    for generation, module in ((2, m2), (1, m1)):
        model = tiny_model(generation)
        ids = torch.randint(0, 4096, (2, 21))
        with torch.no_grad():
            routed = model(ids).logits
            module.causal_conv1d_fn = None  # the modules' own path without causal-conv1d: torch's conv1d, then SiLU
            try:
                own = model(ids).logits
            finally:
                module.causal_conv1d_fn = compat.causal_conv1d
        assert torch.equal(routed, own), generation  # on a CPU the router runs that same computation


@pytest.fixture
def triton_mamba1(monkeypatch):
    """Mamba-1 routed as on a GPU without the compiled scan (our Triton scan, here under Triton's interpreter)."""
    monkeypatch.setattr(compat, "mamba1_scan", lambda device: "triton")


def padded_lengths(model, monkeypatch) -> list[int]:
    """The lengths the scan runs at, per mixer call."""
    import ssmcompress.selective_scan as scan

    seen, original = [], scan.selective_scan_fn
    monkeypatch.setattr(scan, "selective_scan_fn", lambda u, *args: seen.append(u.shape[-1]) or original(u, *args))
    return seen


def test_mamba1_runs_its_mixers_on_aligned_lengths_and_computes_what_it_did(triton_mamba1, monkeypatch):
    model = tiny_model(1, seed=1, n_layer=2, d_model=32)  # small: the scan runs under Triton's interpreter
    ids = torch.randint(1, 4096, (2, 37))
    with torch.no_grad():
        aligned = model(ids).logits
        seen = padded_lengths(model, monkeypatch)
        model(ids)
        assert seen == [48, 48]  # 37 tokens run as 48 in every mixer: no padding inside the scan
        monkeypatch.setattr(compat, "MAMBA1_ALIGN", 1)
        unpadded = model(ids).logits
    assert aligned.shape == unpadded.shape == (2, 37, model.config.vocab_size)
    assert torch.allclose(aligned, unpadded, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scan, runs_at", [("triton", 48), ("cuda", 48), ("ref", 37), ("parallel", 37)])
def test_mamba1_mixers_are_padded_on_the_gpu_scans_only(scan, runs_at, monkeypatch):
    monkeypatch.setattr(compat, "mamba1_scan", lambda device: scan)
    seen = []
    forward = compat.aligned_mamba1(lambda self, hidden_states, inference_params=None: seen.append(
        hidden_states.shape[1]) or hidden_states * 2)
    out = forward(None, torch.ones(2, 37, 8))
    assert seen == [runs_at] and torch.equal(out, torch.full((2, 37, 8), 2.0))


def test_a_reduced_mamba1_on_aligned_mixers_keeps_what_it_kept(triton_mamba1, monkeypatch):
    """The importance of the padded rows is not a token's: the reducer keeps the same positions (ours, and
    DeciMamba's Δ, read by another hook)."""
    from conftest import compose_config
    from ssmcompress import reduction
    from ssmcompress.hosts import mamba_ssm

    model = tiny_model(1, seed=1, n_layer=4, d_model=32)
    ids = torch.randint(1, 4096, (1, 45))
    for method in ("ours", "decimamba"):
        reducer = reduction.from_config(model, compose_config([f"method={method}", "ratio=0.3"]),
                                        mamba_ssm.model_info(model))
        aligned = reducer(ids)
        with monkeypatch.context() as unaligned:
            unaligned.setattr(compat, "MAMBA1_ALIGN", 1)
            plain = reducer(ids)
        reducer.remove()
        assert aligned.positions.shape[1] < 45 and torch.equal(aligned.positions, plain.positions), method
        assert torch.allclose(aligned.logits, plain.logits, atol=1e-5, rtol=1e-5), method


NORM_FAMILIES = ("mamba2", "mamba", "falcon_mamba", "bamba", "granitemoehybrid", "nemotron_h", "falcon_h1", "zamba2",
                 "jamba")


def norm_classes(family: str) -> dict:
    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    compat.route_transformers(module)
    return {name: cls for name, cls in vars(module).items()
            if inspect.isclass(cls) and name.endswith(("RMSNorm", "RMSNormGated")) and cls.__module__ == module.__name__}


@pytest.fixture
def triton_norms(monkeypatch):
    """The GPU route on CPU tensors: mamba-ssm's Triton norms under Triton's interpreter (their launch enters
    torch.cuda.device(x.device.index), which a CPU build cannot, and the plain norm's autotuner, which times its
    configurations on a GPU, gets one)."""
    import mamba_ssm.ops.triton.layer_norm as ln

    monkeypatch.setattr(compat, "_triton_runs_on", lambda device: True)
    launches = []  # one per kernel launch, which enters the device's context
    monkeypatch.setattr(torch.cuda, "device", lambda index: launches.append(index) or contextlib.nullcontext())
    monkeypatch.setattr(ln._layer_norm_fwd_1pass_kernel, "configs", ln._layer_norm_fwd_1pass_kernel.configs[:1])
    return launches


@pytest.mark.parametrize("family", NORM_FAMILIES)
def test_transformers_rmsnorms_of_the_shared_forms_run_mamba_ssms_triton_norms_and_compute_what_they_do(
        family, triton_norms):
    routed = {name: cls for name, cls in norm_classes(family).items()
              if getattr(cls.forward, "_ssmcompress_routed", False)}
    assert routed, family  # every family has at least its block norm in the plain form
    g = torch.Generator().manual_seed(0)
    for name, cls in routed.items():
        gated = name.endswith("Gated")
        norm = cls(64, group_size=16, eps=1e-5) if gated else cls(64, eps=1e-5)
        with torch.no_grad():
            norm.weight.copy_(torch.randn(64, generator=g))
        x, gate = torch.randn(2, 5, 64, generator=g), torch.randn(2, 5, 64, generator=g)
        own = cls.forward.__wrapped__
        with torch.no_grad():
            for args in ((x, gate), (x, None)) if gated else ((x,),):
                launched = len(triton_norms)
                torch.testing.assert_close(norm(*args), own(norm, *args), atol=1e-5, rtol=1e-5)
                assert len(triton_norms) == launched + 1, name
            half = x.to(torch.bfloat16)  # weights in float32, input in bf16
            launched = len(triton_norms)
            if compat.norm_form(cls) == "plain_float32":  # it casts its output to bf16, as the kernel does
                assert norm(half).dtype == torch.bfloat16 and len(triton_norms) == launched + 1
                torch.testing.assert_close(norm(half), own(norm, half))
            else:  # the output is float32, not the kernel's: transformers' code
                assert torch.equal(norm(half), own(norm, half)) and norm(half).dtype == torch.float32
                assert len(triton_norms) == launched


def test_norms_of_other_forms_keep_transformers_code():
    """FalconH1's gated norm (norm before the gate, weights per group) and FalconMamba's weightless norm of B, C and
    Δ are not shared forms: not routed; every other RMSNorm of these families is."""
    found = {name: compat.norm_form(cls) for family in NORM_FAMILIES for name, cls in norm_classes(family).items()}
    assert sorted(name for name, form in found.items() if form is None) == ["FalconH1RMSNormGated",
                                                                           "FalconMambaWeightlessRMSNorm"]
    assert not getattr(norm_classes("falcon_h1")["FalconH1RMSNormGated"].forward, "_ssmcompress_routed", False)
    assert found["NemotronHRMSNorm"] == "plain_float32" and found["Mamba2RMSNorm"] == "plain"
    plain = norm_classes("mamba2")["Mamba2RMSNorm"]
    x = torch.randn(3, 64)
    assert torch.equal(plain(64)(x), plain.forward.__wrapped__(plain(64), x))  # CPU tensors: transformers' code
