"""Latency and memory measurement: protocol (warm-up, interleaving, medians) and that memory peaks are real."""
from pathlib import Path

import pytest
import torch

from conftest import tiny_model
from ssmcompress import compat, records
from ssmcompress.hosts import mamba_ssm
from ssmcompress.metrics import efficiency
from ssmcompress.reduction import kernels

HAS_CLEAR_REFS = Path("/proc/self/clear_refs").exists()


def test_synthetic_batch_is_reproducible_and_avoids_the_pad_id():
    a = efficiency.synthetic_batch(50, 4, 300, "cpu", seed=3)
    assert a.shape == (4, 300) and a.dtype == torch.long
    assert int(a.min()) >= 1 and int(a.max()) < 50
    assert torch.equal(a, efficiency.synthetic_batch(50, 4, 300, "cpu", seed=3))
    assert not torch.equal(a, efficiency.synthetic_batch(50, 4, 300, "cpu", seed=4))


def test_scan_kernel_names_the_scan_that_runs(monkeypatch):
    cuda = torch.device("cuda")  # routing only: nothing runs on the GPU
    monkeypatch.setattr(compat, "HAS_SELECTIVE_SCAN_CUDA", False)
    monkeypatch.setattr(compat, "MAMBA1_SCAN", "auto")
    assert efficiency.scan_kernel(dict(mamba_version=1), cuda) == "ssmcompress Triton selective scan"
    assert efficiency.scan_kernel(dict(mamba_version=2), cuda) == "mamba-ssm Triton SSD"
    assert efficiency.scan_kernel(dict(mamba_version=3), cuda) == "mamba-ssm Triton Mamba-3 SISO"
    monkeypatch.setattr(compat, "HAS_MAMBA3_MIMO", False)
    assert "not representative" in efficiency.scan_kernel(dict(mamba_version=3, mimo_rank=4), cuda)
    monkeypatch.setattr(compat, "HAS_MAMBA3_MIMO", True)
    assert efficiency.scan_kernel(dict(mamba_version=3, mimo_rank=4), cuda) == "mamba-ssm TileLang Mamba-3 MIMO"
    assert efficiency.scan_kernel(dict(mamba_version=1), torch.device("cpu")) == "pure-torch reference (CPU)"
    monkeypatch.setattr(compat, "MAMBA1_SCAN", "ref")
    assert "not representative" in efficiency.scan_kernel(dict(mamba_version=1), cuda)
    monkeypatch.setattr(compat, "HAS_SELECTIVE_SCAN_CUDA", True)
    monkeypatch.setattr(compat, "MAMBA1_SCAN", "auto")
    assert efficiency.scan_kernel(dict(mamba_version=1), cuda) == "mamba-ssm CUDA selective scan"


def test_a_mamba3_record_names_its_decoding_step(monkeypatch):
    model = tiny_model(3)
    info = mamba_ssm.model_info(model)
    cuda = torch.device("cuda")  # routing only: nothing runs on the GPU
    monkeypatch.setattr(compat, "HAS_MAMBA3_STEP", False)  # mamba-ssm's CuTe step did not import: pure torch
    assert records.unrepresentative_paths(efficiency.kernel_paths(model, info, cuda)) == {
        "decode_kernel": f"pure-torch Mamba-3 step (no CuTe kernel): {records.NOT_REPRESENTATIVE}"}
    monkeypatch.setattr(compat, "HAS_MAMBA3_STEP", True)
    assert efficiency.kernel_paths(model, info, cuda)["decode_kernel"] == "mamba-ssm CuTe Mamba-3 step"
    assert "decode_kernel" not in efficiency.kernel_paths(tiny_model(2), mamba_ssm.model_info(tiny_model(2)), cuda)


def test_reduction_kernels_names_the_path_matching_takes(monkeypatch):
    cuda = torch.device("cuda")  # routing only: nothing runs on the GPU
    assert efficiency.reduction_kernels(cuda) == "fused Triton kernels"
    assert efficiency.reduction_kernels(torch.device("cpu")) == "pure-torch reference (CPU)"
    monkeypatch.setattr(kernels, "ROUTE", "reference")
    assert "not representative" in efficiency.reduction_kernels(cuda)


def test_median_ms_warms_up_then_times_each_call_with_gradients_on():
    calls = []
    ms = efficiency.median_ms(lambda: calls.append(torch.is_grad_enabled()), "cpu", repeats=4, warmup=2)
    assert calls == [True] * 6 and ms >= 0


def test_forwards_are_warmed_up_then_interleaved():
    calls = []
    forwards = {"dense": lambda x: calls.append("d"), "reduced": lambda x: calls.append("r")}
    times = efficiency.time_forwards(forwards, torch.zeros(1, 4, dtype=torch.long), warmup=2, repeats=3,
                                     progress=False)
    assert calls == ["d", "d", "r", "r"] + ["d", "r"] * 3
    assert [len(v) for v in times.values()] == [3, 3] and all(t >= 0 for v in times.values() for t in v)


@pytest.mark.skipif(not HAS_CLEAR_REFS, reason="needs Linux /proc/self/clear_refs")
def test_cpu_peak_memory_sees_what_a_forward_allocates():
    def allocates(x):
        block = torch.ones(64 * 2 ** 20 // 4)  # 64 MiB, touched
        return block.sum()

    measured = efficiency.peak_memory(allocates, torch.zeros(1, 1))
    assert measured["peak"] - measured["before"] >= 60 * 2 ** 20
    idle = efficiency.peak_memory(lambda x: x + 1, torch.zeros(1, 1))
    assert idle["peak"] - idle["before"] < 32 * 2 ** 20  # the earlier peak was reset, not carried over


def test_measure_reports_medians_and_ratios(monkeypatch):
    # the clock is faked (no test compares wall-clock timings): each call of a forward takes the next listed time
    seconds = {"dense": iter([0.030, 0.020, 0.025]), "reduced": iter([0.010, 0.012, 0.011])}
    forwards = {"dense": lambda x: "dense", "reduced": lambda x: "reduced"}
    monkeypatch.setattr(efficiency, "time_call", lambda forward, x: next(seconds[forward(x)]))
    out = efficiency.measure(forwards, torch.zeros(2, 8, dtype=torch.long), warmup=0, repeats=3, weights=2 ** 20,
                             progress=False)
    assert out["batch_size"] == 2 and out["length"] == 8 and out["weights_mib"] == 1
    assert out["latencies_ms"]["dense"] == pytest.approx([30.0, 20.0, 25.0])
    assert out["dense_latency_ms"] == pytest.approx(25.0) and out["reduced_latency_ms"] == pytest.approx(11.0)
    assert out["dense_tokens_per_s"] == pytest.approx(16 / 0.025)
    assert out["speedup"] == pytest.approx(25.0 / 11.0)
    if HAS_CLEAR_REFS:
        assert "dense_peak_mib" in out and "peak_memory_saving" in out


@pytest.mark.gpu
def test_cuda_measurement_resets_the_peak_per_call():
    x = torch.zeros(1, 1, device="cuda")
    big = efficiency.peak_memory(lambda t: torch.ones(2 ** 26, device="cuda").sum(), x)
    small = efficiency.peak_memory(lambda t: t + 1, x)
    assert big["peak"] - big["before"] >= 2 ** 28
    assert small["peak"] - small["before"] < 2 ** 20
    assert efficiency.time_call(lambda t: torch.ones(2 ** 20, device="cuda").sum(), x) > 0
    stages = torch.nn.ModuleList([torch.nn.Identity(), torch.nn.Identity()])
    staged = efficiency.peak_memory(lambda t: stages[1](torch.ones(2 ** 26, device="cuda") + stages[0](t)).sum(), x,
                                    stages)
    assert len(staged["stages"]) == 3 and staged["peak"] == max(staged["stages"]) >= big["peak"]


def test_the_generation_benchmark_measures_dense_reduced_and_the_ceiling(tmp_path):
    from conftest import compose_config
    from ssmcompress import runner

    cfg = compose_config(["benchmark=generation", "method=evit", "ratio=0.3", "model.random_init=true",
                          "model.config.n_layer=4", "logger=none", f"results_dir={tmp_path}",
                          "benchmark.measure.repeats=1", "benchmark.measure.warmup=0",
                          "benchmark.measure.shape.cpu.length=24", "benchmark.measure.shape.cpu.new_tokens=3"])
    record = runner.run(cfg, run_dir=tmp_path / "run")
    gen = record["generation"]
    assert (gen["batch_size"], gen["length"], gen["new_tokens"]) == (2, 24, 3)
    for name in ("dense", "reduced", "ceiling"):
        assert gen[f"{name}_generation_ms"] > 0 and gen[f"{name}_prefill_ms"] > 0
        assert gen[f"{name}_tokens_per_s"] == pytest.approx(2 * 3 / gen[f"{name}_generation_ms"] * 1000)
    decode = gen["dense_generation_ms"] - gen["dense_prefill_ms"]
    assert gen["bound"] == gen["prefill_bound"] == pytest.approx(
        gen["dense_generation_ms"] / (gen["ceiling_prefill_ms"] + decode))  # a pure SSM: the prefill's bound
    assert gen["dense_kv_cache_mib"] == 0 and "kv_cache_saving" not in gen
    assert gen["of_bound"] == pytest.approx(gen["speedup"] / gen["bound"])
    assert record["flops"]["achieved_ratio"] > 0.2 and record["efficiency"] is None


class _FakeAllocator:
    """Bytes in use and the peak since the last reset, as torch.cuda's allocator statistics count them."""

    def __init__(self):
        self.in_use = self.peak = 0

    def hold(self, nbytes: int) -> None:
        self.in_use += nbytes
        self.peak = max(self.peak, self.in_use)

    def reset(self) -> None:
        self.peak = self.in_use


def test_stage_peaks_attribute_each_peak_to_the_stage_that_reached_it():
    allocator = _FakeAllocator()

    class Block(torch.nn.Module):
        def __init__(self, transient: int):
            super().__init__()
            self.transient = transient

        def forward(self, x):
            allocator.hold(self.transient)
            allocator.hold(-self.transient)
            return x

    class Head(torch.nn.Module):
        def forward(self, x):
            allocator.hold(250)  # logits, returned
            return x

    layers = torch.nn.ModuleList([Block(100), Block(700), Block(300), Head()])
    # a reducer's hook at block 2's start, registered before the measurement's: its work belongs to stage 2
    layers[1].register_forward_pre_hook(lambda module, args: (allocator.hold(500), allocator.hold(-500)) and None)

    def forward(x):
        allocator.hold(10)  # embedding output, kept
        for layer in layers:
            x = layer(x)
        return x

    peaks = efficiency._stage_peaks(layers, forward, torch.zeros(1, 4), lambda: allocator.peak, allocator.reset)
    assert peaks == [10, 110, 710, 310, 260]  # embedding, blocks 0..2 (block 1 with the hook's 500), head
    assert [h for layer in layers for h in layer._forward_pre_hooks.values()].__len__() == 1  # ours removed


def test_stage_peaks_refuse_a_forward_that_skips_blocks():
    layers = torch.nn.ModuleList([torch.nn.Identity(), torch.nn.Identity()])
    with pytest.raises(RuntimeError, match="started 1 stages for 2 boundary"):
        efficiency._stage_peaks(layers, lambda x: layers[0](x), torch.zeros(1), lambda: 0, lambda: None)
    assert efficiency.stage_peaks(layers, lambda x: x, torch.zeros(1)) is None  # a CPU tensor: no allocator stats


def test_kernel_paths_name_each_op_of_a_transformers_hybrid():
    from ssmcompress.hosts import transformers as hf

    model = hf.build_model(dict(model_type="nemotron_h", vocab_size=64, hidden_size=32, hybrid_override_pattern="M*",
                                mamba_num_heads=2, mamba_head_dim=16, n_groups=1, ssm_state_size=8, chunk_size=8,
                                num_attention_heads=2, num_key_value_heads=1, head_dim=16, intermediate_size=32),
                           device="cpu", dtype="float32")
    info = hf.model_info(model)
    cuda = efficiency.kernel_paths(model, info, torch.device("cuda"))  # routing only: nothing runs on the GPU
    assert cuda["scan_kernel"] == "mamba_ssm.ops.triton.ssd_combined.mamba_chunk_scan_combined"
    assert cuda["conv_kernel"] == efficiency.TRITON_CONV and cuda["attention_kernel"] == "torch SDPA"
    assert cuda["norm_kernel"] == "mamba-ssm Triton RMSNorm"  # both of NemotronH's norms (tests/test_compat.py)
    assert not records.unrepresentative_paths(cuda)
    model.config._attn_implementation = "eager"
    eager = efficiency.kernel_paths(model, info, torch.device("cuda"))
    assert records.unrepresentative_paths(eager) == {"attention_kernel": eager["attention_kernel"]}
    cpu = efficiency.kernel_paths(model, info, torch.device("cpu"))
    assert cpu["scan_kernel"] == cpu["conv_kernel"] == "pure-torch reference (CPU)" and not records.unrepresentative_paths(cpu)


def test_the_generation_benchmark_on_a_hybrid_measures_the_kv_cache_the_schedule_removes(tmp_path):
    from conftest import compose_config
    from ssmcompress import runner

    cfg = compose_config(["benchmark=generation", "model=hybrid-tiny", "method=ours", "ratio=0.3", "logger=none",
                          f"results_dir={tmp_path}", "benchmark.measure.repeats=1", "benchmark.measure.warmup=0",
                          "benchmark.measure.shape.cpu.length=96", "benchmark.measure.shape.cpu.new_tokens=2"])
    gen = runner.run(cfg, run_dir=tmp_path / "run")["generation"]
    per_token = 2 * 2 * 2 * 32 * 4  # 2 rows, keys and values, 2 KV heads of 32, float32
    assert gen["dense_kv_cache_mib"] * 2 ** 20 == per_token * 96 * 2  # two attention layers
    assert 0.2 < gen["expected_kv_cache_saving"] < 0.5
    for name in ("reduced", "ceiling"):  # the same counts: the cache holds what the schedule keeps
        assert 1 - gen[f"{name}_kv_cache_mib"] / gen["dense_kv_cache_mib"] == pytest.approx(
            gen["expected_kv_cache_saving"])
    assert gen["bound"] == pytest.approx(gen["ceiling_speedup"])  # a hybrid decodes faster from a shorter cache
    decode = gen["dense_generation_ms"] - gen["dense_prefill_ms"]
    assert gen["prefill_bound"] == pytest.approx(gen["dense_generation_ms"] / (gen["ceiling_prefill_ms"] + decode))
