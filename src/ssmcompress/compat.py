"""Make mamba-ssm run on any device, with or without its compiled kernels.

Why this module exists: mamba-ssm 2.3.2 imports its CUDA extension (`selective_scan_cuda`) unconditionally,
and its modules call Triton or CUDA kernels that cannot run on a CPU, nor on a GPU where the extension was
not compiled. mamba-ssm also ships pure-torch reference versions of every kernel we need
(`selective_scan_ref`, `ssd_minimal_discrete`, `rms_norm_ref`, `selective_state_update_ref`).
`install()` registers a placeholder for the missing extension so the package imports, then routes each
kernel entry point, per call, to the fast kernel when the tensors live on a CUDA device that can run it and
to mamba-ssm's own reference otherwise; its MHA's attention without flash-attn gets the causal alignment decoding
needs (`decoding_attention`). Mamba-1's selective scan, which mamba-ssm has only as compiled CUDA,
runs on a GPU without it on our Triton port (`ssmcompress.selective_scan`); `MAMBA1_SCAN` picks the scan. The causal
conv, which mamba-ssm has only in the compiled causal-conv1d, runs on a GPU without it on our Triton kernel
(`ssmcompress.causal_conv`, conv and SiLU in one pass).
The model code itself is never copied or changed. `route_transformers(module)` does the same for the kernel functions
and RMSNorm modules of a transformers SSM modeling module (Mamba, Mamba2, the hybrids): pure torch on a CPU, kernels on
a GPU.

Call `install()` before importing anything from `mamba_ssm` (importing `ssmcompress.models` does it).
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
import os
import sys
import types

import torch
import torch.nn.functional as F

from ssmcompress import causal_conv, mamba3_reference
from ssmcompress import selective_scan as triton_scan
from ssmcompress.config import ConfigError

_installed = False
HAS_SELECTIVE_SCAN_CUDA = False  # compiled CUDA selective scan (Mamba-1 fast path)
HAS_CAUSAL_CONV1D = False  # compiled causal-conv1d (fused paths of both Mamba generations)
# Mamba-1's selective scan (also settable as the environment variable SSMCOMPRESS_MAMBA1_SCAN):
#   "auto"      on CUDA tensors mamba-ssm's compiled CUDA scan where installed, else our Triton scan;
#               on CPU tensors mamba-ssm's sequential reference `selective_scan_ref`
#   "cuda"      mamba-ssm's compiled scan on CUDA tensors (an error where it is not installed), to compare
#   "triton"    our Triton scan on CUDA tensors, also where the compiled one is installed
#   "ref"       mamba-ssm's reference everywhere
#   "parallel"  mambapy's parallel scan everywhere (pure torch; see selective_scan_parallel): fast CPU training
# With "cuda" or "triton", CPU tensors run the reference. Mamba-1's fused path (`mamba_inner_fn`) is kept off
# without the compiled scan (hosts.mamba_ssm.kernel_config), so every forward goes through `selective_scan_fn`.
MAMBA1_SCANS = ("auto", "cuda", "triton", "ref", "parallel")
MAMBA1_SCAN = os.environ.get("SSMCOMPRESS_MAMBA1_SCAN", "auto")


def causal_conv1d(x, weight, bias=None, activation=None, seq_idx=None):
    """The causal conv of mamba-ssm's and transformers' Mamba layers: our Triton kernel on CUDA tensors, else the
    computation those layers do without causal-conv1d (ssmcompress.causal_conv)."""
    if _triton_runs_on(x.device):
        return causal_conv.causal_conv1d_fn(x, weight, bias, activation, seq_idx)
    return causal_conv.causal_conv1d_reference(x, weight, bias, activation, seq_idx)


def _triton_runs_on(device: torch.device) -> bool:
    # strict: a tensor passed here (whose `.type` is a method, never equal to "cuda") would route every GPU call
    # to the references without a word
    if not isinstance(device, torch.device):
        raise TypeError(f"_triton_runs_on takes a torch.device, got {type(device).__name__}")
    return device.type == "cuda"


def mamba1_scan(device: torch.device) -> str:
    """The selective scan Mamba-1 runs on `device` under MAMBA1_SCAN: "cuda", "triton", "ref" or "parallel"."""
    if MAMBA1_SCAN not in MAMBA1_SCANS:
        raise ConfigError(f"MAMBA1_SCAN (SSMCOMPRESS_MAMBA1_SCAN) must be one of {', '.join(MAMBA1_SCANS)}, "
                          f"got {MAMBA1_SCAN!r}")
    if MAMBA1_SCAN in ("ref", "parallel") or device.type != "cuda":
        return MAMBA1_SCAN if MAMBA1_SCAN == "parallel" else "ref"
    if MAMBA1_SCAN == "cuda" or (MAMBA1_SCAN == "auto" and HAS_SELECTIVE_SCAN_CUDA):
        if not HAS_SELECTIVE_SCAN_CUDA:
            raise ConfigError("MAMBA1_SCAN='cuda' needs mamba-ssm's compiled selective_scan_cuda, which is not "
                              "installed; use 'auto' or 'triton'")
        return "cuda"
    return "triton" if _triton_runs_on(device) else "ref"  # reference_kernels() sends it to the reference


MAMBA1_ALIGN = 16  # tokens: the length Mamba-1's mixer runs at on the Triton scan is a multiple of this


def aligned_mamba1(forward):
    """mamba-ssm's Mamba-1 mixer forward, run on CUDA tensors (our Triton scan or mamba-ssm's compiled one) on its
    input padded at the end to a multiple of MAMBA1_ALIGN tokens, its output cut back to the real ones.

    Why: mamba-ssm's Mamba-1 multiplies in_proj (and, off its fused path, dt_proj) with the batch·length tokens as
    the leading dimension of the result (`weight @ x.t()`); where that is not a multiple of 8, cuBLAS has no
    tensor-core kernel for it, and our Triton scan pads five inputs itself (`selective_scan._padding`). A reduced
    sequence is almost never aligned: measured on an H100, mamba-2.8b at batch 1 x 2048 with 10 % of the FLOPs
    removed ran at 0.40x the dense model, the ceiling's cut alone at 0.40x, and 1.04x with counts in multiples of 16
    (schedule=chunk); on the compiled scan, unpadded, at 0.84x at batch 8 x 2048 and 0.41x at 1 x 8192.
    Padding once at the mixer's input aligns every one of these. The mixer is causal, so tokens appended at the end
    change no earlier output; the path with a cache (inference_params) is left alone, since the padded steps would
    enter the cached states. Hooks on the mixer's modules see the padded rows (the reducer keeps the first ones)."""
    def forward_aligned(self, hidden_states, inference_params=None, **kwargs):
        length = hidden_states.shape[1]
        pad = -length % MAMBA1_ALIGN
        if not pad or inference_params is not None or mamba1_scan(hidden_states.device) not in ("triton", "cuda"):
            return forward(self, hidden_states, inference_params=inference_params, **kwargs)
        return forward(self, F.pad(hidden_states, (0, 0, 0, pad)), **kwargs)[:, :length]

    forward_aligned._ssmcompress_aligned = True
    return functools.wraps(forward)(forward_aligned)


@contextlib.contextmanager
def reference_kernels():
    """While active, every kernel entry point runs mamba-ssm's pure-torch reference, on a GPU too (FLOP counting
    traces the model, which Triton kernels do not survive; the GPU check compares the two paths)."""
    global _triton_runs_on
    route = _triton_runs_on
    _triton_runs_on = lambda x: False  # noqa: E731
    try:
        yield
    finally:
        _triton_runs_on = route


def install() -> None:
    """Idempotently make `import mamba_ssm` work and route kernels per device (see module docstring)."""
    global _installed, HAS_SELECTIVE_SCAN_CUDA, HAS_CAUSAL_CONV1D
    if _installed:
        return
    try:
        import selective_scan_cuda  # noqa: F401

        HAS_SELECTIVE_SCAN_CUDA = not getattr(selective_scan_cuda, "_ssmcompress_placeholder", False)
    except ImportError:
        placeholder = types.ModuleType("selective_scan_cuda")
        placeholder._ssmcompress_placeholder = True
        sys.modules["selective_scan_cuda"] = placeholder
    try:
        HAS_CAUSAL_CONV1D = importlib.util.find_spec("causal_conv1d_cuda") is not None
    except (ImportError, ValueError):
        HAS_CAUSAL_CONV1D = False

    import mamba_ssm.models.mixer_seq_simple as mixer_seq
    import mamba_ssm.modules.block as block
    import mamba_ssm.modules.mamba2 as m2
    import mamba_ssm.modules.mamba_simple as m1
    import mamba_ssm.ops.triton.layer_norm as ln
    import mamba_ssm.ops.triton.layernorm_gated as lng
    from mamba_ssm.ops.selective_scan_interface import selective_scan_ref
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update_ref

    fast = dict(
        selective_scan_fn=m1.selective_scan_fn,
        chunk_scan=m2.mamba_chunk_scan_combined,
        layer_norm_fn=ln.layer_norm_fn,
        rms_norm_fn=ln.rms_norm_fn,
        gated_rmsnorm_fn=lng.rmsnorm_fn,
        state_update=m1.selective_state_update,
    )

    def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          return_last_state=False):
        route = mamba1_scan(u.device)
        if route == "cuda":
            return fast["selective_scan_fn"](u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
        if route == "triton":
            return triton_scan.selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                                 return_last_state)
        scan = selective_scan_parallel if (route == "parallel" and not return_last_state) else selective_scan_ref
        return scan(u, delta, A, B, C, D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
                    return_last_state=return_last_state)

    def chunk_scan(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None,
                   cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, float("inf")), return_final_states=False,
                   return_varlen_states=False):
        if _triton_runs_on(x.device):
            return fast["chunk_scan"](x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias,
                                      initial_states=initial_states, seq_idx=seq_idx, cu_seqlens=cu_seqlens,
                                      dt_softplus=dt_softplus, dt_limit=dt_limit,
                                      return_final_states=return_final_states,
                                      return_varlen_states=return_varlen_states)
        if initial_states is not None or seq_idx is not None or cu_seqlens is not None or return_varlen_states:
            raise NotImplementedError("the CPU reference chunk scan supports full-sequence forwards only (no initial "
                                      "states, seq_idx or cu_seqlens)")
        return chunk_scan_reference(x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias,
                                    dt_softplus=dt_softplus, dt_limit=dt_limit,
                                    return_final_states=return_final_states)

    def layer_norm_fn(x, weight, bias, residual=None, x1=None, weight1=None, bias1=None, eps=1e-6, dropout_p=0.0,
                      rowscale=None, prenorm=False, residual_in_fp32=False, is_rms_norm=False,
                      return_dropout_mask=False):
        if _triton_runs_on(x.device):
            return fast["layer_norm_fn"](x, weight, bias, residual=residual, x1=x1, weight1=weight1, bias1=bias1,
                                         eps=eps, dropout_p=dropout_p, rowscale=rowscale, prenorm=prenorm,
                                         residual_in_fp32=residual_in_fp32, is_rms_norm=is_rms_norm,
                                         return_dropout_mask=return_dropout_mask)
        if x1 is not None or rowscale is not None or dropout_p > 0 or return_dropout_mask:
            raise NotImplementedError("CPU layer norm: x1/rowscale/dropout are not supported")
        return add_norm_reference(x, weight, bias, residual, eps, prenorm, residual_in_fp32, is_rms_norm,
                                  ln.rms_norm_ref, ln.layer_norm_ref)

    def rms_norm_fn(x, weight, bias, residual=None, x1=None, weight1=None, bias1=None, eps=1e-6, dropout_p=0.0,
                    rowscale=None, prenorm=False, residual_in_fp32=False, return_dropout_mask=False):
        return layer_norm_fn(x, weight, bias, residual=residual, x1=x1, weight1=weight1, bias1=bias1, eps=eps,
                             dropout_p=dropout_p, rowscale=rowscale, prenorm=prenorm,
                             residual_in_fp32=residual_in_fp32, is_rms_norm=True,
                             return_dropout_mask=return_dropout_mask)

    def gated_rmsnorm_fn(x, weight, bias, z=None, eps=1e-6, group_size=None, norm_before_gate=True):
        if _triton_runs_on(x.device):
            return fast["gated_rmsnorm_fn"](x, weight, bias, z=z, eps=eps, group_size=group_size,
                                            norm_before_gate=norm_before_gate)
        return lng.rms_norm_ref(x, weight, bias, z=z, eps=eps, group_size=group_size,
                                norm_before_gate=norm_before_gate, upcast=True)

    def state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, **kwargs):
        if _triton_runs_on(x.device) and fast["state_update"] is not None:
            return fast["state_update"](state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus,
                                        **kwargs)
        out = selective_state_update_ref(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus)
        return out

    m1.selective_scan_fn = selective_scan_fn
    if not getattr(m1.Mamba.forward, "_ssmcompress_aligned", False):
        m1.Mamba.forward = aligned_mamba1(m1.Mamba.forward)
    m2.mamba_chunk_scan_combined = chunk_scan
    if not HAS_CAUSAL_CONV1D:  # both Mamba modules then call torch's conv1d and a separate SiLU
        m1.causal_conv1d_fn = m2.causal_conv1d_fn = causal_conv1d
    for module in (block, mixer_seq, m1, ln):
        module.layer_norm_fn = layer_norm_fn
    for module in (mixer_seq, m1, ln):
        module.rms_norm_fn = rms_norm_fn
    lng.rmsnorm_fn = gated_rmsnorm_fn
    m1.selective_state_update = state_update
    m2.selective_state_update = state_update
    _route_mamba3()
    if not torch.cuda.is_available():
        import mamba_ssm.utils.generation as generation

        generation.torch = _torch_with_inert_events()
    import mamba_ssm.modules.mha as mha

    mha.F = _functional_with_decoding_attention()
    _installed = True


def _mamba3_blocks(create_block):
    """mamba-ssm's `create_block`, which in 2.3.2 builds only Mamba1 and Mamba2 mixers, also building Mamba3 ones
    (`ssm_cfg.layer: Mamba3`): the same block (norm, mixer, MLP) with `mamba_ssm.modules.mamba3.Mamba3` as its mixer,
    built by create_block itself with Mamba2's place in its namespace lent to Mamba3 for that one call."""
    import mamba_ssm.models.mixer_seq_simple as mixer_seq

    def create(d_model, d_intermediate, ssm_cfg=None, *args, **kwargs):
        if (ssm_cfg or {}).get("layer") != "Mamba3":
            return create_block(d_model, d_intermediate, ssm_cfg, *args, **kwargs)
        from mamba_ssm.modules.mamba3 import Mamba3

        lent, mixer_seq.Mamba2 = mixer_seq.Mamba2, Mamba3
        try:
            return create_block(d_model, d_intermediate, {**ssm_cfg, "layer": "Mamba2"}, *args, **kwargs)
        finally:
            mixer_seq.Mamba2 = lent

    create._ssmcompress_mamba3 = True
    return create


HAS_MAMBA3_MIMO = False  # mamba-ssm's TileLang MIMO kernel imports (TileLang installed)
HAS_MAMBA3_STEP = False  # mamba-ssm's CuTe Mamba-3 decoding step imports (elsewhere: mamba3_reference.step)


def _route_mamba3() -> None:
    """Mamba-3's layers: mamba-ssm's Triton SISO kernel where Triton runs, its TileLang MIMO kernel where TileLang is
    installed and Triton runs, else the pure-torch layers (ssmcompress.mamba3_reference), which also let mamba-ssm
    build a MIMO mixer without TileLang. Skipped where mamba-ssm's Mamba-3 module does not import."""
    global HAS_MAMBA3_MIMO, HAS_MAMBA3_STEP
    try:
        import mamba_ssm.modules.mamba3 as m3
    except ImportError:
        return
    fast = m3.mamba3_siso_combined
    if getattr(fast, "_ssmcompress_routed", False):
        return

    def mamba3_siso_combined(*args, **kwargs):
        values = kwargs["V"] if "V" in kwargs else args[2]
        return (fast if _triton_runs_on(values.device) else mamba3_reference.mamba3_siso)(*args, **kwargs)

    fast_mimo = m3.mamba3_mimo_combined  # None without TileLang (mamba3.py's guarded import)
    HAS_MAMBA3_MIMO = fast_mimo is not None

    def mamba3_mimo_combined(*args, **kwargs):
        values = kwargs["V"] if "V" in kwargs else args[2]
        runs_kernel = fast_mimo is not None and _triton_runs_on(values.device)
        return (fast_mimo if runs_kernel else mamba3_reference.mamba3_mimo)(*args, **kwargs)

    mamba3_siso_combined._ssmcompress_routed = mamba3_mimo_combined._ssmcompress_routed = True
    m3.mamba3_siso_combined, m3.mamba3_mimo_combined = mamba3_siso_combined, mamba3_mimo_combined
    import mamba_ssm.ops.triton.mamba3.mamba3_siso_combined as combined

    # both kernels' angle cumsum, with the reducer's factors on the steps (mamba3_reference.ANGLE_STEP_SCALE; the
    # forward only: a scaled step's gradient is not the layer's, and nothing trains under reduction)
    exact_angles = combined.angle_dt_fwd

    def angle_dt_fwd(angle, dt, *args, **kwargs):
        return exact_angles(angle, mamba3_reference.angle_dt(dt), *args, **kwargs)

    combined.angle_dt_fwd = angle_dt_fwd
    if HAS_MAMBA3_MIMO:
        import mamba_ssm.ops.tilelang.mamba3.mamba3_mimo as mimo

        mimo.angle_dt_fwd = angle_dt_fwd
    fast_step = m3.Mamba3.step
    HAS_MAMBA3_STEP = m3.mamba3_step_fn is not None  # its CuTe decoding kernel imports (nvidia-cutlass-dsl installed)

    def mamba3_step(self, u, *states, **kwargs):
        return (fast_step(self, u, *states, **kwargs) if HAS_MAMBA3_STEP and _triton_runs_on(u.device)
                else mamba3_reference.step(self, u, *states))

    m3.Mamba3.step = mamba3_step
    import mamba_ssm.models.mixer_seq_simple as mixer_seq

    if not getattr(mixer_seq.create_block, "_ssmcompress_mamba3", False):
        mixer_seq.create_block = _mamba3_blocks(mixer_seq.create_block)


# transformers' SSM modules pick their kernels once, when imported (`use_kernel_func_from_hub_with_fallback`):
# mamba-ssm's Triton/CUDA functions where `import mamba_ssm` succeeds, else their own pure-torch code. Which one a
# process gets depends on whether install() ran before the import (without it, `import mamba_ssm` fails where its
# CUDA extension is missing, and a GPU then runs the pure-torch scan), and mamba-ssm's kernels cannot run on a CPU.
# route_transformers() makes the choice per call instead, as install() does for mamba-ssm's own modules: on CPU
# tensors the module's pure-torch function; on CUDA tensors mamba-ssm's kernel for the scans and state updates
# (MAMBA_SSM_KERNELS, whatever transformers resolved at import; the Mamba-1 scan through install()'s router: our
# Triton scan where the compiled extension is missing), for the causal conv causal-conv1d where transformers found it,
# else our Triton kernel (ssmcompress.causal_conv) in place of torch's conv1d, what transformers resolved for the
# others, and transformers' unfused Mamba-1 code where mamba-ssm's fused Mamba-1 path would need the compiled
# extension.
TRANSFORMERS_KERNELS = ("causal_conv1d_fn", "causal_conv1d_update", "mamba_inner_fn", "mamba_selective_state_update",
                        "mamba_selective_scan", "mamba2_split_conv1d_scan_combined", "mamba2_selective_state_update",
                        "mamba2_chunk_scan")
MAMBA_SSM_KERNELS = {
    "mamba2_chunk_scan": ("mamba_ssm.ops.triton.ssd_combined", "mamba_chunk_scan_combined"),
    "mamba2_selective_state_update": ("mamba_ssm.ops.triton.selective_state_update", "selective_state_update"),
    "mamba_selective_state_update": ("mamba_ssm.ops.triton.selective_state_update", "selective_state_update"),
    "mamba_selective_scan": ("mamba_ssm.modules.mamba_simple", "selective_scan_fn"),  # install() routed it
}


def route_transformers(module: types.ModuleType) -> None:
    """Route the kernel functions and RMSNorm modules of a transformers modeling module (e.g. `modeling_mamba2`) per
    call; idempotent."""
    for name in TRANSFORMERS_KERNELS:
        resolved = getattr(module, name, None)
        if resolved is None or getattr(resolved, "_ssmcompress_routed", False):
            continue
        pure = getattr(resolved, "__wrapped__", resolved)  # functools.wraps keeps transformers' own function
        setattr(module, name, _routed(name, resolved, pure))
    for norm in vars(module).values():
        form = norm_form(norm)
        if form is not None and not getattr(norm.forward, "_ssmcompress_routed", False):
            norm.forward = _routed_norm(norm.forward, form)


# transformers' RMSNorm modules compute in float32 with one kernel per operation (a cast, the square, the mean, the
# reciprocal root, two products, a cast back: measured on an H100, about half of a Mamba-2 2.7B's bf16 forward at batch
# 8 x 2048 went to such elementwise kernels, where mamba-ssm's host runs its Triton norms). On CUDA tensors the forms
# the SSM families share run on mamba-ssm's Triton RMSNorms instead: the plain one (T5LayerNorm: weight times the normed
# input cast back to its dtype), the plain one that casts after the product (NemotronH's), and the grouped one that
# gates first (norm_before_gate=False, `group_size`). A module class takes the route only where its forward is bytecode
# for bytecode one of these classes'; one whose output dtype would not be its input's (weights of another dtype) and
# calls under torch.compile, which fuses them itself, keep transformers' code. The kernels round once, where the plain
# form rounds the normed input, then the product.
CANONICAL_NORMS = {"plain": ("transformers.models.mamba2.modeling_mamba2", "Mamba2RMSNorm"),
                   "plain_float32": ("transformers.models.nemotron_h.modeling_nemotron_h", "NemotronHRMSNorm"),
                   "gated": ("transformers.models.mamba2.modeling_mamba2", "MambaRMSNormGated")}


def _bytecode(function) -> tuple:
    code = function.__code__
    return code.co_code, code.co_consts, code.co_names, code.co_varnames


@functools.cache
def _canonical_norms() -> dict:
    forms = {}
    for form, (module, name) in CANONICAL_NORMS.items():
        forward = getattr(importlib.import_module(module), name).forward
        forms[_bytecode(getattr(forward, "__wrapped__", forward))] = form
    return forms


def norm_form(candidate) -> str | None:
    """"plain", "plain_float32" or "gated" for a transformers RMSNorm class whose forward is one of the canonical
    forms, else None."""
    if not (inspect.isclass(candidate) and issubclass(candidate, torch.nn.Module)
            and candidate.__name__.endswith(("RMSNorm", "RMSNormGated"))):
        return None
    forward = getattr(candidate.forward, "__wrapped__", candidate.forward)
    return _canonical_norms().get(_bytecode(forward)) if hasattr(forward, "__code__") else None


def _routed_norm(forward, form: str):
    install()  # mamba-ssm's norm functions, as install() routes them per device
    ln = importlib.import_module("mamba_ssm.ops.triton.layer_norm")
    lng = importlib.import_module("mamba_ssm.ops.triton.layernorm_gated")

    def kernel_runs(module, x) -> bool:  # the float32 form casts its output to the input's dtype whatever the weights'
        return (_triton_runs_on(x.device) and not torch.compiler.is_compiling()
                and (form == "plain_float32" or torch.result_type(module.weight, x) == x.dtype))

    def plain(self, hidden_states):
        if not kernel_runs(self, hidden_states):
            return forward(self, hidden_states)
        return ln.rms_norm_fn(hidden_states, self.weight, None, eps=self.variance_epsilon)

    def grouped(self, hidden_states, gate=None):
        if not kernel_runs(self, hidden_states):
            return forward(self, hidden_states, gate)
        return lng.rmsnorm_fn(hidden_states, self.weight, None, z=gate, eps=self.variance_epsilon,
                              group_size=self.group_size, norm_before_gate=False)

    route = functools.wraps(forward)(grouped if form == "gated" else plain)
    route._ssmcompress_routed = True
    return route


def _cuda_kernel(name: str, resolved, pure):
    """What a routed function runs on CUDA tensors (see above)."""
    if name == "mamba_inner_fn" and not HAS_SELECTIVE_SCAN_CUDA:
        return pure  # transformers' stand-in returns None: the unfused path runs
    if name == "causal_conv1d_fn" and _implementation(resolved) is pure:  # transformers' torch conv: our kernel
        return _triton_conv_or(pure)
    if name not in MAMBA_SSM_KERNELS:
        return resolved
    install()
    module, attribute = MAMBA_SSM_KERNELS[name]
    return getattr(importlib.import_module(module), attribute)


def _triton_conv_or(pure):
    """Our Triton causal conv with transformers' signature, or transformers' own torch conv for what the kernel does
    not do (another activation; transformers' torch conv ignores packed sequences, so the call does too)."""
    def conv(hidden_states, weight, bias=None, activation=None, **kwargs):
        if activation not in causal_conv.ACTIVATIONS:
            return pure(hidden_states, weight, bias, activation=activation, **kwargs)
        return causal_conv.causal_conv1d_fn(hidden_states, weight, bias, activation)

    conv.__module__, conv.__qualname__ = causal_conv.__name__, "causal_conv1d_fn"  # what the records name
    return conv


def _routed(name: str, resolved, pure):
    cuda = _cuda_kernel(name, resolved, pure)
    # transformers passes every call the keyword arguments of its own function; a kernel takes those it names
    params = tuple(inspect.signature(cuda).parameters) if cuda is not resolved else None

    def route(*args, **kwargs):
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        if first is None or not _triton_runs_on(first.device):
            return pure(*args, **kwargs)
        if params is not None:
            kwargs = {k: v for k, v in kwargs.items() if k in params}
        return cuda(*args, **kwargs)

    route._ssmcompress_routed = True
    route._ssmcompress_cuda = cuda
    route.__wrapped__ = pure
    return route


def _implementation(function):
    """The function a kernel wrapper of transformers (`use_kernel_func_from_hub_with_fallback`) calls: the package's
    kernel, or transformers' own torch code where the package did not import. Read from the wrapper's closure, where
    transformers keeps it (it exposes no attribute for it)."""
    try:
        return inspect.getclosurevars(function).nonlocals.get("implementation", function)
    except TypeError:  # not a Python function
        return function


def transformers_kernel(module: types.ModuleType, name: str):
    """(the function a routed kernel function of a transformers modeling module runs on CUDA tensors, transformers'
    own pure-torch function), or None where the module has no such function."""
    routed = getattr(module, name, None)
    if routed is None:
        return None
    pure = getattr(routed, "__wrapped__", routed)
    return _implementation(getattr(routed, "_ssmcompress_cuda", routed)), pure


class _InertEvent:
    """Stands in for torch.cuda.Event where a CPU build of torch refuses to make one (see below)."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def elapsed_time(self, other) -> float:
        return 0.0


def decoding_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
    """scaled_dot_product_attention with a causal mask aligned to the last key when there are fewer queries than keys
    (decoding from a cache: the new tokens see every cached key). torch aligns `is_causal` to the first key, so
    without flash-attn (which aligns to the last) mamba-ssm's MHA decodes every step attending to the first cached
    token alone (pytorch/pytorch#108108)."""
    queries, keys = query.shape[-2], key.shape[-2]
    if is_causal and attn_mask is None and queries != keys:
        attn_mask = torch.ones(keys, keys, dtype=torch.bool, device=query.device).tril()[keys - queries:]
        is_causal = False
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                          is_causal=is_causal, scale=scale, **kwargs)


def _functional_with_decoding_attention():
    """torch.nn.functional, as mamba-ssm's MHA module sees it, with `decoding_attention` for its attention."""
    view = types.SimpleNamespace(**{name: getattr(F, name) for name in dir(F) if not name.startswith("__")})
    view.scaled_dot_product_attention = decoding_attention
    return view


def _torch_with_inert_events():
    """torch, as mamba-ssm's generation module sees it, with an inert cuda.Event. Its `decode` makes two CUDA events
    before it decodes, also when it does not time (enable_timing=False), and a CPU build of torch raises when asked
    for one; everything else it calls runs on a CPU. So decoding on a CPU is mamba-ssm's own loop too."""
    cuda = types.SimpleNamespace(**{name: getattr(torch.cuda, name) for name in dir(torch.cuda)
                                    if not name.startswith("__")})
    cuda.Event = _InertEvent
    view = types.SimpleNamespace(**{name: getattr(torch, name) for name in dir(torch) if not name.startswith("__")})
    view.cuda = cuda
    return view


def chunk_scan_reference(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, dt_softplus=False,
                         dt_limit=(0.0, float("inf")), return_final_states=False):
    """`mamba_chunk_scan_combined` through mamba-ssm's `ssd_minimal_discrete` (pure torch), for any length.

    We use `ssd_minimal_discrete` rather than `ssd_chunk_scan_combined_ref`: the latter exponentiates unmasked
    segment sums, whose overflow makes dt's gradient NaN, and it is slower. The minimal SSD needs the discretised
    inputs (x*dt, A*dt), per-head B/C and a length divisible by the chunk: we apply dt_bias/softplus/dt_limit as the
    Triton kernel does, expand groups to heads, right-pad (causal, so padding cannot change earlier outputs), and add
    the D skip and z gate afterwards. `return_final_states`: also the state after the last token (b, h, p, n), as
    the kernel returns it for a prefill that fills an inference cache.
    """
    from mamba_ssm.modules.ssd_minimal import ssd_minimal_discrete

    batch, length, nheads, headdim = x.shape
    dtype = x.dtype
    dt = dt.float() + dt_bias.float() if dt_bias is not None else dt.float()
    dt = F.softplus(dt) if dt_softplus else dt
    if tuple(dt_limit) != (0.0, float("inf")):
        dt = dt.clamp(*dt_limit)
    heads_per_group = nheads // B.shape[2]
    B = B.float().repeat_interleave(heads_per_group, dim=2)
    C = C.float().repeat_interleave(heads_per_group, dim=2)
    xf = x.float()
    pad = (-length) % chunk_size
    padded = [F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (xf * dt[..., None], B, C)]
    # the padding neither adds to the state (x·dt = 0) nor decays it (A·dt = 0): the final state is the last token's
    y, final_state = ssd_minimal_discrete(padded[0], F.pad(A.float() * dt, (0, 0, 0, pad)), padded[1], padded[2],
                                          chunk_size)
    y = y[:, :length]
    if D is not None:
        y = y + xf * (D.float()[:, None] if D.dim() == 1 else D.float())
    if z is not None:
        y = y * F.silu(z.float())
    return (y.to(dtype), final_state) if return_final_states else y.to(dtype)


def add_norm_reference(x, weight, bias, residual, eps, prenorm, residual_in_fp32, is_rms_norm, rms_ref, ln_ref):
    """The fused add+norm of `mamba_ssm.ops.triton.layer_norm.layer_norm_fn`, through mamba-ssm's references.

    Matches the kernel's dtypes: the sum is taken in fp32, the normalised output has x's dtype, and the returned
    residual keeps the incoming residual's dtype (fp32 when `residual_in_fp32` and there is none yet).
    """
    residual_dtype = residual.dtype if residual is not None else (torch.float32 if residual_in_fp32 else x.dtype)
    ref = rms_ref if is_rms_norm else ln_ref
    out = ref(x, weight, bias, residual=residual, eps=eps, prenorm=True, upcast=True)
    normed, summed = out
    normed = normed.to(x.dtype)
    return (normed, summed.to(residual_dtype)) if prenorm else normed


def selective_scan_parallel(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                            return_last_state=False):
    """Mamba-1 selective scan with mambapy's parallel (Blelloch) scan instead of a loop over time.

    Same inputs, outputs and maths as mamba-ssm's `selective_scan_ref` (real A, input-dependent B and C of shape
    (b, n, l)); used to train Mamba-1 where the compiled CUDA scan is missing, since the reference's Python loop
    over the sequence makes backward passes very slow. Tested against `selective_scan_ref`.
    """
    from mambapy.pscan import pscan

    if return_last_state or A.is_complex() or B.dim() != 3 or C.dim() != 3:
        raise NotImplementedError("parallel scan: real A and (b, n, l) B/C only, no last state")
    dtype_in = u.dtype
    u, delta = u.float(), delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias[..., None].float()
    if delta_softplus:
        delta = F.softplus(delta)
    delta_t, u_t = delta.transpose(1, 2), u.transpose(1, 2)  # (b, l, d)
    deltaA = torch.exp(delta_t.unsqueeze(-1) * A.float())  # (b, l, d, n)
    deltaB_u = (delta_t * u_t).unsqueeze(-1) * B.float().transpose(1, 2).unsqueeze(2)  # (b, l, d, n)
    states = pscan(deltaA, deltaB_u)  # (b, l, d, n)
    y = (states @ C.float().transpose(1, 2).unsqueeze(-1)).squeeze(-1).transpose(1, 2)  # (b, d, l)
    out = y if D is None else y + u * D.float()[:, None]
    if z is not None:
        out = out * F.silu(z.float())
    return out.to(dtype_in)
