"""Specifications of the step profiler: which steps it covers, what it writes, and how it splits GPU time."""

from __future__ import annotations

import gzip
import json

import pytest
import torch

from genesis.config import ProfilingConfig
from genesis_model.profiling import StepProfiler, summarize_trace


def kernel(name: str, start_us: float, duration_us: float, stream: int) -> dict:
    return {"ph": "X", "cat": "kernel", "name": name, "ts": start_us, "dur": duration_us, "args": {"stream": stream}}


def test_gpu_time_is_split_into_compute_and_the_communication_no_compute_overlapped():
    # Over 2 steps of 1 s wall: compute 0-300 ms and 500-700 ms on stream 7; an all-gather at 200-400 ms on
    # stream 20 (100 ms of it alone), a reduce-scatter at 800-900 ms (all alone); a CPU op is not GPU time.
    trace = {"traceEvents": [
        kernel("sm90_gemm_bf16", 0, 300_000, 7),
        kernel("triton_fused_rms_norm", 500_000, 200_000, 7),
        kernel("ncclDevKernel_AllGather_RING_LL", 200_000, 200_000, 20),
        kernel("ncclDevKernel_ReduceScatter_Sum_f32", 800_000, 100_000, 20),
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 900_000},
    ]}
    summary = summarize_trace(trace, wall_s=2.0, steps=2)
    gpu = summary["gpu"]
    assert summary["wall_s_per_step"] == pytest.approx(1.0)
    assert gpu["compute_s_per_step"] == pytest.approx(0.25)          # (300 + 200) ms over 2 steps
    assert gpu["communication_s_per_step"] == pytest.approx(0.15)    # (200 + 100) ms
    assert gpu["communication_exposed_s_per_step"] == pytest.approx(0.10)  # (100 + 100) ms alone
    assert gpu["busy_s_per_step"] == pytest.approx(0.35)
    assert gpu["idle_s_per_step"] == pytest.approx(0.65)
    assert gpu["streams"] == {"20": pytest.approx(0.15), "7": pytest.approx(0.25)}
    assert summary["top_kernels"][0]["name"] == "sm90_gemm_bf16"


def test_a_trace_without_device_events_has_no_gpu_figures():
    summary = summarize_trace({"traceEvents": [{"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 5}]},
                              wall_s=0.5, steps=1)
    assert summary["gpu"] is None and summary["wall_s_per_step"] == 0.5


def test_the_profiler_covers_exactly_the_configured_steps_and_writes_summary_ops_and_trace(tmp_path):
    profiler = StepProfiler(ProfilingConfig(start_step=3, steps=2), tmp_path / "profile", rank=1,
                            device=torch.device("cpu"))
    weights = torch.randn(64, 64, requires_grad=True)
    summaries = {}
    for steps_done in range(6):
        profiler.before_step(steps_done)
        (weights @ weights).sum().backward()
        summaries[steps_done + 1] = profiler.after_step(steps_done + 1)
    assert [step for step, summary in summaries.items() if summary] == [4]
    summary = json.loads((tmp_path / "profile" / "rank1.summary.json").read_text())
    assert summary["steps"] == [3, 4] and summary["rank"] == 1 and summary["wall_s_per_step"] > 0
    assert "aten::mm" in (tmp_path / "profile" / "rank1.cpu_ops.txt").read_text()
    with gzip.open(tmp_path / "profile" / "rank1.trace.json.gz") as trace:
        assert json.load(trace)["traceEvents"]
    assert not (tmp_path / "profile" / "rank1.trace.json").exists()


def test_start_step_zero_profiles_nothing(tmp_path):
    profiler = StepProfiler(ProfilingConfig(), tmp_path / "profile", rank=0, device=torch.device("cpu"))
    for steps_done in range(3):
        profiler.before_step(steps_done)
        assert profiler.after_step(steps_done + 1) is None
    assert not (tmp_path / "profile").exists()
