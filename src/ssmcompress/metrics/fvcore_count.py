"""FLOPs of a traced forward with fvcore's `FlopCountAnalysis`, with handles for the SSM kernels and attention.

fvcore counts linear layers, matmuls, convolutions and einsums itself; it cannot see inside custom kernels, which
jit tracing records as one `prim::PythonOp.<ClassName>` node each. mamba-ssm's GPU kernels are such nodes
(`MambaChunkScanCombinedFn`, `SelectiveScanFn`, `LayerNormFn`, and the fused `MambaSplitConv1dScanCombinedFn`,
`MambaInnerFn`), and `HANDLES` counts each with the analytic formulas of `flops.py`.

The CPU path (compat.py) runs mamba-ssm's pure-torch references instead: dozens of einsums and elementwise ops that
fvcore would count by a different rule than the kernel they stand for. So that both paths count the same model the
same way, `kernels_as_ops()` wraps each reference, for the duration of a count only, in an autograd Function named
like the kernel it replaces and called with the kernel's argument layout; the trace then holds one node per kernel
call on both paths and the same handle counts it. The maths executed is unchanged. (A reference is wrapped where it
is called, never around a kernel: jit records a Function nested inside another as a second node.)
"""
from __future__ import annotations

import contextlib
import importlib
import math

import torch
from torch import nn

from ssmcompress import compat, hosts, mamba3_reference
from ssmcompress import flops as analytic

# ---------------------------------------------------------------------------------------------------- handles


def _shape(value) -> list[int]:
    from fvcore.nn.jit_handles import get_shape

    shape = get_shape(value)
    if shape is None:
        raise RuntimeError("fvcore handle: an input of a mamba-ssm kernel has no known shape in the trace")
    return shape


def chunk_scan_handle(chunk_size: int):
    """`MambaChunkScanCombinedFn(x, dt, A, B, C, chunk_size, ...)`: x (b, l, h, p), B (b, l, g, n)."""
    def handle(inputs, outputs) -> float:
        batch, length, nheads, headdim = _shape(inputs[0])
        ngroups, d_state = _shape(inputs[3])[2:]
        return batch * length * analytic.ssd_scan_flops_per_token(length, nheads, headdim, ngroups, d_state,
                                                                   chunk_size)
    return handle


def selective_scan_handle(inputs, outputs) -> float:
    """`SelectiveScanFn(u, delta, A, B, C, ...)`: u (b, d, l), A (d, n)."""
    batch, d_inner, length = _shape(inputs[0])
    d_state = _shape(inputs[2])[-1]
    return batch * length * analytic.selective_scan_flops_per_token(d_inner, d_state)


def mamba3_handle(chunk_size: int):
    """mamba-ssm's two Functions named `_Mamba3Function`: SISO's (Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D,
    Z, ...) with Q (b, l, g, n), and MIMO's (Q, K, V, ADT, DT, Trap, Q_bias, K_bias, MIMO_V, MIMO_Z, MIMO_Out, ...)
    with Q (b, l, R, g, n), which sums the ranks' outputs itself where MIMO_Out is given (its output has no rank
    axis then); V (b, l, h, p)."""
    def handle(inputs, outputs) -> float:
        query = _shape(inputs[0])
        batch, length, nheads, headdim = _shape(inputs[2])
        info = dict(d_model=0, d_inner=nheads * headdim, d_state=query[-1], ngroups=query[-2], nheads=nheads,
                    headdim=headdim, chunk_size=chunk_size, n_angles=0, outproj_norm=0)
        if len(query) == 5:
            info["mimo_rank"] = query[2]
        parts = analytic.mamba3_flops_per_token(info, length)
        sums_ranks = len(query) == 5 and len(_shape(outputs[0])) == 4  # (b, l, h, p), not (b, l, R, h, p)
        return batch * length * (parts["scan"] + (parts["mimo_out"] if sums_ranks else 0))
    return handle


def norm_handle(inputs, outputs) -> float:
    """Both mamba-ssm classes named `LayerNormFn` (fused add+norm, gated RMSNorm): x is the first input."""
    return analytic.norm_flops(math.prod(_shape(inputs[0])))


def split_conv_scan_handle(info: dict):
    """`MambaSplitConv1dScanCombinedFn(zxbcdt, conv_weight, ...)` (Mamba-2's fused path): conv, scan, gated norm
    and out_proj of a block; zxbcdt is (b, l, in_proj width). The norm and out_proj are optional arguments."""
    def handle(inputs, outputs) -> float:
        batch, length = _shape(inputs[0])[:2]
        shapes = [_shape(v) for v in inputs[1:] if _is_tensor(v)]
        parts = analytic.mixer_flops_per_token(info, length)
        per_token = parts["conv"] + parts["scan"]
        if [info["d_inner"]] in shapes:  # rmsnorm_weight
            per_token += analytic.norm_flops(info["d_inner"])
        if [info["d_model"], info["d_inner"]] in shapes:  # outproj_weight
            per_token += parts["out_proj"]
        return batch * length * per_token
    return handle


def mamba_inner_handle(info: dict):
    """`MambaInnerFn(xz, ...)` (Mamba-1's fused path): conv, x_proj, dt_proj, scan and out_proj; xz is (b, 2e, l)."""
    def handle(inputs, outputs) -> float:
        batch, _, length = _shape(inputs[0])
        parts = analytic.mixer_flops_per_token(info, length)
        return batch * length * sum(parts[k] for k in ("conv", "x_proj", "dt_proj", "scan", "out_proj"))
    return handle


def attention_handle(inputs, outputs) -> float:
    """`scaled_dot_product_attention(q, k, v, ...)`, q (b, h, q, d), k (b, h_kv, kv, d): scores and weighted values
    over the query-key pairs a causal prefill computes (q(q+1)/2 per head where q = kv; all q·kv pairs otherwise, as
    a decoding step's), one multiply-add each per head dimension."""
    batch, heads, queries, head_dim = _shape(inputs[0])
    keys = _shape(inputs[1])[2]
    pairs = queries * (queries + 1) / 2 if queries == keys else queries * keys
    return 2 * batch * heads * head_dim * pairs


def grouped_mm_handle(inputs, outputs) -> float:
    """`_grouped_mm(a, b, offs)` (transformers' mixture of experts): each row of a (t, k) times its group's (k, n)
    matrix: t·k·n, as many multiply-adds as the rows' separate matrix products."""
    return math.prod(_shape(outputs[0])) * _shape(inputs[0])[-1]


def _is_tensor(value) -> bool:
    return isinstance(value.type(), torch._C.TensorType)


def handles(info: dict) -> dict:
    """fvcore op handles for every mamba-ssm kernel a forward of this model can call, on either path."""
    return {
        "prim::PythonOp.MambaChunkScanCombinedFn": chunk_scan_handle(info.get("chunk_size", 256)),
        "prim::PythonOp.MambaSplitConv1dScanCombinedFn": split_conv_scan_handle(info),
        "prim::PythonOp.SelectiveScanFn": selective_scan_handle,
        "prim::PythonOp.MambaInnerFn": mamba_inner_handle(info),
        "prim::PythonOp.LayerNormFn": norm_handle,
        "prim::PythonOp._Mamba3Function": mamba3_handle(info.get("chunk_size", 64)),
        "aten::scaled_dot_product_attention": attention_handle,
        "aten::_grouped_mm": grouped_mm_handle,
    }


# ------------------------------------------------------------------------------- references as named ops


def _named_op(name: str, forward):
    """An autograd Function called `name` whose forward is `forward(*args)`: one `prim::PythonOp.<name>` node."""
    def op_forward(ctx, *args):
        # the tracer would record every op of the reference into the node's subgraph, which nobody reads: pause it
        state = torch._C._get_tracing_state()
        torch._C._set_tracing_state(None)
        try:
            return forward(*args)
        finally:
            torch._C._set_tracing_state(state)

    def op_backward(ctx, *grads):
        raise RuntimeError(f"{name} is a FLOP-counting wrapper; it has no backward")

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(op_forward),
                                                   "backward": staticmethod(op_backward)})


@contextlib.contextmanager
def kernels_as_ops():
    """While active, the CPU references of mamba-ssm's kernels trace as single ops named like those kernels."""
    import mamba_ssm.modules.mamba_simple as m1
    import mamba_ssm.ops.triton.layer_norm as ln
    import mamba_ssm.ops.triton.layernorm_gated as lng


    chunk_scan_ref, add_norm_ref = compat.chunk_scan_reference, compat.add_norm_reference
    gated_norm_ref, selective_scan_router = lng.rms_norm_ref, m1.selective_scan_fn

    # argument layouts follow the kernels' `.apply(...)` calls in mamba-ssm 2.3.2 (tensors first where they are)
    chunk_scan_op = _named_op("MambaChunkScanCombinedFn", lambda x, dt, A, B, C, chunk_size, D, z, dt_bias,
                              initial_states, seq_idx, cu_seqlens, dt_softplus, dt_limit: chunk_scan_ref(
                                  x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus,
                                  dt_limit=dt_limit))
    add_norm_op = _named_op("LayerNormFn", lambda x, weight, bias, residual, x1, weight1, bias1, eps, dropout_p,
                            rowscale, prenorm, residual_in_fp32, is_rms_norm, return_dropout_mask: add_norm_ref(
                                x, weight, bias, residual, eps, prenorm, residual_in_fp32, is_rms_norm,
                                ln.rms_norm_ref, ln.layer_norm_ref))
    gated_norm_op = _named_op("LayerNormFn", lambda x, weight, bias, z, eps, group_size, norm_before_gate,
                              is_rms_norm: gated_norm_ref(x, weight, bias, z=z, eps=eps, group_size=group_size,
                                                          norm_before_gate=norm_before_gate, upcast=True))
    selective_scan_op = _named_op("SelectiveScanFn", selective_scan_router)
    mamba3_ref = mamba3_reference.mamba3_siso
    mamba3_op = _named_op("_Mamba3Function", lambda Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D, Z, chunk_size:
                          mamba3_ref(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D=D, Z=Z, chunk_size=chunk_size))

    def mamba3(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D=None, Z=None, Input_States=None, chunk_size=64,
               return_final_states=False, cu_seqlens=None):
        if Input_States is not None or return_final_states or cu_seqlens is not None:
            raise NotImplementedError("fvcore counts plain forwards of whole sequences")
        return mamba3_op.apply(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D, Z, chunk_size)

    mimo_ref = mamba3_reference.mamba3_mimo
    mimo_op = _named_op("_Mamba3Function", mimo_ref)

    def mamba3_mimo(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, MIMO_V, MIMO_Z, MIMO_Out, Angles, D, Z, chunk_size,
                    rotary_dim_divisor=4, dtype=None, return_state=False, cu_seqlens=None):
        if return_state or cu_seqlens is not None:
            raise NotImplementedError("fvcore counts plain forwards of whole sequences")
        return mimo_op.apply(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, MIMO_V, MIMO_Z, MIMO_Out, Angles, D, Z,
                             chunk_size, rotary_dim_divisor, dtype)

    def chunk_scan(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, dt_softplus=False,
                   dt_limit=(0.0, float("inf")), return_final_states=False):
        if return_final_states:  # a prefill into an inference cache: not what the FLOPs of a forward count
            raise NotImplementedError("fvcore counts plain forwards, not prefills that return the SSM states")
        return chunk_scan_op.apply(x, dt, A, B, C, chunk_size, D, z, dt_bias, None, None, None, dt_softplus,
                                   dt_limit)

    def add_norm(x, weight, bias, residual, eps, prenorm, residual_in_fp32, is_rms_norm, rms_ref, ln_ref):
        return add_norm_op.apply(x, weight, bias, residual, None, None, None, eps, 0.0, None, prenorm,
                                 residual_in_fp32, is_rms_norm, False)

    def gated_norm(x, weight, bias, z=None, eps=1e-6, group_size=None, norm_before_gate=True, upcast=True):
        return gated_norm_op.apply(x, weight, bias, z, eps, group_size, norm_before_gate, True)

    def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False):
        if u.is_cuda and compat.HAS_SELECTIVE_SCAN_CUDA:  # compat routes this to the kernel: it traces by itself
            return selective_scan_router(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
        return selective_scan_op.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)

    compat.chunk_scan_reference, compat.add_norm_reference = chunk_scan, add_norm
    lng.rms_norm_ref, m1.selective_scan_fn = gated_norm, selective_scan
    mamba3_reference.mamba3_siso, mamba3_reference.mamba3_mimo = mamba3, mamba3_mimo
    # on a GPU too, route to the references while tracing: Triton kernels cannot run under torch.jit.trace (their
    # block sizes, computed from traced shapes, are no longer constants), and one route counts both devices alike
    try:
        with compat.reference_kernels():
            yield
    finally:
        compat.chunk_scan_reference, compat.add_norm_reference = chunk_scan_ref, add_norm_ref
        lng.rms_norm_ref, m1.selective_scan_fn = gated_norm_ref, selective_scan_router
        mamba3_reference.mamba3_siso, mamba3_reference.mamba3_mimo = mamba3_ref, mimo_ref


NORM_CLASSES = ("RMSNorm", "RMSNormGated", "LayerNorm")  # transformers' norm modules, by class-name suffix


@contextlib.contextmanager
def transformers_as_ops(model):
    """While active, a transformers SSM model's scans and norm modules trace as single ops named like mamba-ssm's
    kernels (MambaChunkScanCombinedFn, SelectiveScanFn, LayerNormFn), with those kernels' argument layouts."""
    module = importlib.import_module(type(model).__module__)
    replaced = {}
    if hasattr(module, "mamba2_chunk_scan"):
        pure = getattr(module.mamba2_chunk_scan, "__wrapped__", module.mamba2_chunk_scan)
        op = _named_op("MambaChunkScanCombinedFn", lambda x, dt, A, B, C, chunk_size, D, dt_bias, dt_softplus,
                       dt_limit: pure(x, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias, dt_softplus=dt_softplus,
                                      dt_limit=dt_limit))

        def chunk_scan(x, dt, A, B, C, chunk_size, D=None, dt_bias=None, initial_states=None, dt_softplus=False,
                       dt_limit=(0.0, float("inf")), return_final_states=False, **kwargs):
            if return_final_states or initial_states is not None:
                raise NotImplementedError("fvcore counts plain forwards, not prefills that return the SSM states")
            return op.apply(x, dt, A, B, C, chunk_size, D, dt_bias, dt_softplus, tuple(dt_limit))
        replaced["mamba2_chunk_scan"] = chunk_scan
    if hasattr(module, "mamba_selective_scan"):
        pure_scan = getattr(module.mamba_selective_scan, "__wrapped__", module.mamba_selective_scan)
        scan_op = _named_op("SelectiveScanFn", lambda u, delta, A, B, C, D, z, delta_bias, delta_softplus: pure_scan(
            u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus))

        def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                           return_last_state=False, **kwargs):
            if return_last_state:
                raise NotImplementedError("fvcore counts plain forwards, not prefills that return the SSM states")
            return scan_op.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
        replaced["mamba_selective_scan"] = selective_scan
    originals = {name: getattr(module, name) for name in replaced}
    norms = [m for m in model.modules() if type(m).__name__.endswith(NORM_CLASSES) and "forward" not in vars(m)]
    norm_op = _named_op("LayerNormFn", lambda x, gate, forward: forward(x) if gate is None else forward(x, gate))
    for norm in norms:
        norm.forward = (lambda forward: lambda x, gate=None: norm_op.apply(x, gate, forward))(norm.forward)
    for name, function in replaced.items():
        setattr(module, name, function)
    try:
        with compat.reference_kernels():
            yield
    finally:
        for name, function in originals.items():
            setattr(module, name, function)
        for norm in norms:
            del norm.forward


# ---------------------------------------------------------------------------------------------------- counting


class _Traced(nn.Module):
    """The module fvcore traces: `forward(input_ids)` -> logits, with the model as submodule `model` so that
    per-module counts carry the model's own module names."""

    def __init__(self, model: nn.Module, forward):
        super().__init__()
        self.model, self._forward = model, forward

    def forward(self, input_ids):
        return self._forward(input_ids)


def count_forward(model: nn.Module, forward, input_ids: torch.Tensor, info: dict) -> dict:
    """fvcore FLOPs of `forward(input_ids)` (a callable that runs `model` and returns logits) for the whole batch:
    total, per block, lm_head, the rest (final norm, reduction work outside blocks), by operator, and the ops fvcore
    saw but does not count (elementwise work; see flops.py for the convention)."""
    from fvcore.nn import FlopCountAnalysis

    host = hosts.of_model(model)
    ops = kernels_as_ops() if host is hosts.mamba_ssm else transformers_as_ops(model)
    with torch.no_grad(), ops:
        analysis = FlopCountAnalysis(_Traced(model, forward), (input_ids,))
        analysis.set_op_handle(**handles(info))
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        by_module = analysis.by_module()
        by_operator = dict(analysis.by_operator())
        unsupported = dict(analysis.unsupported_ops())
    names = {id(module): f"model.{name}" for name, module in model.named_modules()}
    per_layer = [float(by_module.get(names[id(layer)], 0)) for layer in host.layers(model)]
    total = float(by_module[""])
    lm_head = float(by_module.get(names[id(host.lm_head(model))], 0))
    return dict(total=total, per_layer=per_layer, lm_head=lm_head, other=total - sum(per_layer) - lm_head,
                by_operator={k: float(v) for k, v in by_operator.items()}, uncounted_ops=unsupported)
