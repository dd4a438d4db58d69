"""GPU check (issue 7): the bundled Mamba-2 model's logits with mamba-ssm's Triton kernels vs the pure-torch
reference path on the same GPU, dense and token-reduced (method=ours ratio=0.3), fp32 and bf16.

    python experiments/gpu/check_kernels.py      # on the lent GPU; wheels as in experiments/gpu/efficiency.sh
"""
import json
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from ssmcompress import compat, models
from ssmcompress.config import register_resolvers
from ssmcompress.runner import build_reducer

CONF = Path(__file__).resolve().parents[2] / "conf"


def logits(model, reducer, ids, lengths, reference: bool):
    compat._triton_runs_on = (lambda x: False) if reference else (lambda x: x.is_cuda)
    with torch.no_grad():
        if reducer is None:
            return model(ids).logits.float()
        return reducer(ids, lengths=lengths).logits.float()


def main() -> None:
    register_resolvers()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose("config", overrides=["method=ours", "ratio=0.3"])
    torch.manual_seed(0)
    device = sys.argv[2] if len(sys.argv) > 2 else "cuda"  # "cpu": a smoke test of this script (both paths equal)
    ids = torch.randint(1, 4096, (4, 512), device=device)
    lengths = torch.full((4,), 512, device=device)
    report = {}
    for dtype in ("float32", "bfloat16") if device == "cuda" else ("float32",):
        model = models.load_model(str(Path(cfg.model.path)), device, dtype).eval()
        info = models.model_info(model)
        for name in ("dense", "ours@0.3"):
            reducer = None if name == "dense" else build_reducer(model, cfg, info)
            fast, ref = (logits(model, reducer, ids, lengths, r) for r in (False, True))
            if reducer is not None:
                reducer.remove()
            if fast.shape != ref.shape:  # the paths kept different tokens (near-tied importance)
                report[f"{dtype}/{name}"] = dict(shape_mismatch=[list(fast.shape), list(ref.shape)])
                continue
            ok = torch.isfinite(fast) & torch.isfinite(ref)
            diff = (fast - ref)[ok].abs()
            report[f"{dtype}/{name}"] = dict(max_abs=diff.max().item(), mean_abs=diff.mean().item(),
                                             logit_scale=ref[ok].abs().mean().item(),
                                             argmax_agree=(fast.argmax(-1) == ref.argmax(-1)).float().mean().item())
    print(json.dumps(report, indent=1))
    json.dump(report, open(sys.argv[1] if len(sys.argv) > 1 else "check_kernels.json", "w"), indent=1)


if __name__ == "__main__":
    main()
