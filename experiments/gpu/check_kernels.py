"""GPU check: the bundled models' logits with mamba-ssm's Triton kernels vs the pure-torch reference path
on the same GPU, dense and token-reduced (method=ours ratio=0.3), fp32 and bf16. Mamba-2: Triton SSD scan, gated
RMSNorm and fused add+norm; Mamba-1: our Triton selective scan (ssmcompress.selective_scan, where mamba-ssm's
compiled CUDA scan is not installed) and the Triton fused add+norm.

    python experiments/gpu/check_kernels.py      # on a GPU; wheels as in experiments/gpu/efficiency.sh
"""
import contextlib
import itertools
import json
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from ssmcompress import compat, reduction
from ssmcompress.hosts import mamba_ssm
from ssmcompress.config import CONF_DIR, register_resolvers



def logits(model, reducer, ids, lengths, reference: bool):
    """(logits, original position of each slot) on the Triton path or on the reference path."""
    with torch.no_grad(), compat.reference_kernels() if reference else contextlib.nullcontext():
        if reducer is None:
            return model(ids).logits.float(), torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        out = reducer(ids, lengths=lengths)
        return out.logits.float(), out.positions


def compare(fast, ref) -> dict:
    """Logit differences where both paths hold the same token. A reduced forward decides which tokens to keep
    from activations, so the two paths can keep different tokens where importances or similarities are nearly
    tied (the kernels round differently: TF32 dot products, bf16); from a row's first differing slot on, slots
    hold different tokens and are not compared, and `same_tokens` reports how much of the output was comparable."""
    (fast_logits, fast_pos), (ref_logits, ref_pos) = fast, ref
    width = min(fast_pos.shape[1], ref_pos.shape[1])
    same = (fast_pos[:, :width] == ref_pos[:, :width]).long().cumprod(1).bool()  # the identical prefix per row
    a, b = fast_logits[:, :width][same], ref_logits[:, :width][same]
    ok = torch.isfinite(a) & torch.isfinite(b)
    diff = (a - b)[ok].abs()
    kept = [set(p.tolist()) for p in fast_pos], [set(p.tolist()) for p in ref_pos]
    jaccard = sum(len(x & y) / len(x | y) for x, y in zip(*kept)) / len(kept[0])
    return dict(max_abs=diff.max().item(), mean_abs=diff.mean().item(), logit_scale=b[ok].abs().mean().item(),
                argmax_agree=(a.argmax(-1) == b.argmax(-1)).float().mean().item(),
                same_tokens=same.float().mean().item(), kept_jaccard=jaccard)


def main() -> None:
    register_resolvers()
    device = sys.argv[2] if len(sys.argv) > 2 else "cuda"  # "cpu": a smoke test of this script (both paths equal)
    report = {}
    for model_name, dtype in itertools.product(("mamba2-tiny", "mamba-tiny"),
                                               ("float32", "bfloat16") if device == "cuda" else ("float32",)):
        with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
            cfg = compose("config", overrides=[f"model={model_name}", "method=ours", "ratio=0.3"])
        torch.manual_seed(0)
        ids = torch.randint(1, 4096, (4, 512), device=device)
        lengths = torch.full((4,), 512, device=device)
        model = mamba_ssm.load_model(str(Path(cfg.model.path)), device, dtype).eval()
        info = mamba_ssm.model_info(model)
        for name in ("dense", "ours@0.3"):
            reducer = None if name == "dense" else reduction.from_config(model, cfg, info)
            fast, ref = (logits(model, reducer, ids, lengths, r) for r in (False, True))
            if reducer is not None:
                reducer.remove()
            report[f"{model_name}/{dtype}/{name}"] = compare(fast, ref)
    print(json.dumps(report, indent=1))
    json.dump(report, open(sys.argv[1] if len(sys.argv) > 1 else "check_kernels.json", "w"), indent=1)


if __name__ == "__main__":
    main()
