"""The dt columns a Mamba-2 mixer's in_proj output ends with (before dt_bias and the softplus), alike in mamba-ssm's
Mamba2 and transformers' Mamba2-family mixers: the Δ filter's hook on them, written once for both hosts, which differ
only in how they reach the mixer and name its head count and Δ floor."""
from __future__ import annotations

from ssmcompress.errors import ConfigError

# a dt column value whose step Δ = softplus(dt + bias) is exactly 0 in float32 (exp underflows): the token neither
# enters the head's state nor decays it; finite, so fp16 and bf16 hold it
ZERO_STEP_DT = -1e4


def attach_filter(mixer, index: int, heads_name: str, floor_name: str, keep) -> list:
    """Hooks through which `keep(dt)` drops tokens from layer `index`'s Mamba-2 heads: dt is Δ before its softplus
    (the mixer's `heads_name` dt columns plus dt_bias, (batch, length, heads)); where keep's mask is False, Δ becomes 0
    (ZERO_STEP_DT). keep returns None: nothing changes. In place: the reducer runs without gradients. Refused where
    the mixer clamps Δ from below after the softplus (its `floor_name` limits): there no Δ can be 0."""
    if not hasattr(mixer, "dt_bias"):
        raise ConfigError(f"layer {index} has no Mamba-2 mixer, whose heads a Δ filter drops tokens from")
    heads, floor = getattr(mixer, heads_name), float(getattr(mixer, floor_name, (0.0,))[0])
    if floor > 0:
        raise ConfigError(f"layer {index}'s Mamba-2 mixer clamps Δ to at least {floor} ({floor_name}), so a Δ filter "
                          f"cannot set it to 0")

    def hook(module, args, out):
        dt = out[..., -heads:]
        mask = keep(dt + mixer.dt_bias)
        if mask is not None:
            dt.masked_fill_(~mask, ZERO_STEP_DT)
        return out

    return [mixer.in_proj.register_forward_hook(hook)]
