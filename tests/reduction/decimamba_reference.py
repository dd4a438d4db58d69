"""DeciMamba's token selection, transcribed from the authors' code (github.com/assafbk/DeciMamba, commit 6290e95,
mamba_ssm/ops/selective_scan_interface.py `get_non_decimated_indices`, MIT License, Copyright (c) 2024 Assaf
Ben-Kish), and the score it is given in `MambaInnerFn.forward` (the causal conv with SiLU, x_proj, dt_proj's weight
without its bias). Only the CUDA imports are left out."""
import numpy as np
import torch
import torch.nn.functional as F


def get_non_decimated_indices(delta_t, delta_bias, response_length, layer_num=None, decimation_config=None):
    activate = decimation_config['activate']
    decimation_type = decimation_config['type']
    beta = decimation_config['beta']
    min_seq_length = decimation_config['min_seq_len']
    L_base = decimation_config['L_base']
    decimating_layers = decimation_config['decimating_layers']
    L = delta_t.shape[2]
    if not activate:
        return torch.arange(L)
    L_for_dec = L-response_length
    if layer_num not in decimating_layers or L_for_dec == 0:
        return torch.arange(L)
    s = decimating_layers.index(layer_num)
    delta_t = F.softplus(delta_t + torch.broadcast_to(delta_bias.unsqueeze(dim=0).unsqueeze(dim=2),delta_t.shape))
    if decimation_type == 'max_p':
        if L_base == torch.inf:
            not_decimated = torch.arange(L_for_dec)
        else:
            max_amount_of_tokens = L_base * (beta**s)
            delta_t_norm = torch.norm(delta_t, p=2, dim=1)
            delta_t_norm = delta_t_norm[:,:L_for_dec]
            amount_to_decimate = int(np.max([np.min([L_for_dec, max_amount_of_tokens]), min_seq_length]))
            _, not_decimated = torch.topk(delta_t_norm, amount_to_decimate, dim=1, largest=True, sorted=False)
            not_decimated, _ = torch.sort(not_decimated.squeeze())
    not_decimated = torch.cat([not_decimated, torch.arange(L_for_dec,L).to(not_decimated.device)])
    return not_decimated


def mamba1_delta(mixer, hidden_states):
    """MambaInnerFn.forward's `delta` for a mamba-ssm Mamba mixer's input (1, L, d_model): (1, d_inner, L)."""
    L = hidden_states.shape[1]
    x, _ = (hidden_states @ mixer.in_proj.weight.t()).transpose(1, 2).chunk(2, dim=1)
    conv1d_out = F.silu(F.conv1d(x, mixer.conv1d.weight, mixer.conv1d.bias, padding=mixer.d_conv - 1,
                                 groups=x.shape[1])[..., :L])
    x_dbl = F.linear(conv1d_out.transpose(1, 2).reshape(L, -1), mixer.x_proj.weight)
    return (mixer.dt_proj.weight @ x_dbl[:, :mixer.dt_proj.in_features].t()).unsqueeze(0)
