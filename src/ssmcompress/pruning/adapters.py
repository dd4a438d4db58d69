"""The pruning core's adapter per model family: targets.py (mamba-ssm) and hf_targets.py (transformers). Each says
which linear layers a block has, how their inputs are observed and how a block runs on captured inputs; the core
(sequential.py, check_config) is the same for both."""
from __future__ import annotations

from types import ModuleType

from ssmcompress.pruning import hf_targets, targets

ADAPTERS = {"mamba": targets, "hf": hf_targets}


def of_model(model) -> ModuleType:
    return hf_targets if hf_targets.handles(model) else targets


def in_order(chosen, available, kind: str) -> list[str]:
    """The chosen targets in the block's order; ValueError for a name the block does not have."""
    unknown = sorted(set(chosen) - set(available))
    if unknown:
        raise ValueError(f"{kind} have no prunable layer {', '.join(unknown)}: choose from {', '.join(available)}")
    return [name for name in available if name in chosen]
