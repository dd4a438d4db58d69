"""A straightforward recurrent forward of mamba-ssm's LM, written from the papers' equations, token by token.

Independent of mamba-ssm's kernels and references: used to check that the CPU path computes the same function.
"""
import torch
import torch.nn.functional as F


def rms_norm(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def causal_conv(x, conv):  # x: (b, l, c); depthwise, kernel k, left-padded
    k = conv.weight.shape[-1]
    padded = F.pad(x, (0, 0, k - 1, 0))
    out = sum(padded[:, i: i + x.shape[1]] * conv.weight[:, 0, i] for i in range(k))
    return out + conv.bias


def mamba2_mixer(m, u):
    b, l, _ = u.shape
    e, g, n, h, p = m.d_ssm, m.ngroups, m.d_state, m.nheads, m.headdim
    z, xbc, dt = torch.split(u @ m.in_proj.weight.T, [e, e + 2 * g * n, h], dim=-1)
    xbc = F.silu(causal_conv(xbc, m.conv1d))
    x, B, C = torch.split(xbc, [e, g * n, g * n], dim=-1)
    x, B, C = x.view(b, l, h, p), B.view(b, l, g, n), C.view(b, l, g, n)
    dt = F.softplus(dt + m.dt_bias)
    A = -torch.exp(m.A_log)
    group = torch.arange(h) // (h // g)
    state = x.new_zeros(b, h, p, n)
    ys = []
    for t in range(l):
        decay = torch.exp(dt[:, t] * A)  # (b, h)
        state = state * decay[..., None, None] + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, group][:, :, None]
        ys.append((state * C[:, t, group][:, :, None]).sum(-1) + m.D[:, None] * x[:, t])
    y = torch.stack(ys, 1).reshape(b, l, e)
    y = y * F.silu(z)  # norm_before_gate=False: gate, then a group RMSNorm
    y = y.view(b, l, g, e // g)
    y = (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + m.norm.eps)).reshape(b, l, e) * m.norm.weight
    return y @ m.out_proj.weight.T


def mamba1_mixer(m, u):
    b, l, _ = u.shape
    x, z = (u @ m.in_proj.weight.T).chunk(2, dim=-1)
    x = F.silu(causal_conv(x, m.conv1d))
    dt, B, C = torch.split(x @ m.x_proj.weight.T, [m.dt_rank, m.d_state, m.d_state], dim=-1)
    dt = F.softplus(dt @ m.dt_proj.weight.T + m.dt_proj.bias)
    A = -torch.exp(m.A_log)  # (e, n)
    state = x.new_zeros(b, m.d_inner, m.d_state)
    ys = []
    for t in range(l):
        state = torch.exp(dt[:, t, :, None] * A) * state + (dt[:, t] * x[:, t])[..., None] * B[:, t, None, :]
        ys.append((state * C[:, t, None, :]).sum(-1) + m.D * x[:, t])
    y = torch.stack(ys, 1) * F.silu(z)
    return y @ m.out_proj.weight.T


@torch.no_grad()
def reference_logits(model, input_ids):
    backbone = model.backbone
    hidden, residual = backbone.embedding(input_ids), None
    for block in backbone.layers:
        residual = hidden if residual is None else hidden + residual
        normed = rms_norm(residual, block.norm.weight, block.norm.eps)
        mixer = block.mixer
        hidden = mamba2_mixer(mixer, normed) if hasattr(mixer, "nheads") else mamba1_mixer(mixer, normed)
    out = rms_norm(hidden + residual, backbone.norm_f.weight, backbone.norm_f.eps)
    return out @ model.lm_head.weight.T
