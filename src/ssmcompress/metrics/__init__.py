"""Metrics of a run besides accuracy: FLOPs (analytic and fvcore), latency, throughput and peak memory."""


def from_config(model, reducer, cfg, info: dict) -> dict:
    """Measurements for the runner's record (keys `flops`, `efficiency`); filled in by issue #5."""
    return {}
