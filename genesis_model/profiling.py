"""Profile a few optimizer steps on every rank: where the step's wall time goes, GPU work against waiting.

`profiling.start_step: N` wraps steps N .. N+steps-1 in `torch.profiler` and writes, per rank, into
`run_dir/profile/`:
  * `rank{r}.summary.json`: wall time per step; the GPU's busy time (union of kernel and copy intervals),
    split into compute and communication (NCCL kernels) and how much communication no compute overlapped;
    busy time per CUDA stream; the top kernels;
  * `rank{r}.cpu_ops.txt`: the CPU-side op table (a step whose GPU idles while the CPU is busy is launch-bound);
  * `rank{r}.trace.json.gz` (with `profiling.trace: true`): the whole timeline, for Perfetto or chrome://tracing.

The question it answers first: on several GPUs, is the time lost to communication that nothing overlaps, or to
the CPU not keeping the GPU fed? Both leave the compute stream idle, in different places of the summary. Note
that an NCCL kernel runs from its launch until every peer has joined, so a rank waiting for a slower one shows
long "communication" while the slow rank shows idle time: read the ranks' summaries side by side.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import time
from collections import defaultdict
from pathlib import Path

import torch

from genesis.config import ProfilingConfig

_DEVICE_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset"}


def _union_us(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by possibly overlapping [start, end) intervals."""
    total, current_start, current_end = 0.0, None, None
    for start, end in sorted(intervals):
        if current_end is None or start > current_end:
            if current_end is not None:
                total += current_end - current_start
            current_start, current_end = start, end
        else:
            current_end = max(current_end, end)
    if current_end is not None:
        total += current_end - current_start
    return total


def is_communication_kernel(name: str) -> bool:
    return "nccl" in name.lower()


def device_events(trace: dict) -> list[dict]:
    """A Chrome trace's GPU events (kernels, copies, memsets) with a duration, in microseconds."""
    return [e for e in trace.get("traceEvents", [])
            if e.get("ph") == "X" and e.get("cat") in _DEVICE_CATEGORIES and e.get("dur") is not None]


def summarize_trace(trace: dict, wall_s: float, steps: int) -> dict:
    """GPU time per step from a Chrome trace's device events (times in microseconds)."""
    events = device_events(trace)
    if not events:
        return {"wall_s_per_step": wall_s / steps, "gpu": None, "top_kernels": []}

    def interval(event: dict) -> tuple[float, float]:
        return float(event["ts"]), float(event["ts"]) + float(event["dur"])

    communication = [interval(e) for e in events if is_communication_kernel(e["name"])]
    compute = [interval(e) for e in events if not is_communication_kernel(e["name"])]
    by_stream: dict[str, list] = defaultdict(list)
    by_name: dict[str, list[float]] = defaultdict(list)
    for event in events:
        by_stream[str(event.get("args", {}).get("stream", "?"))].append(interval(event))
        by_name[event["name"]].append(float(event["dur"]))
    busy = _union_us(communication + compute)
    compute_busy = _union_us(compute)
    per_step = 1e-6 / steps
    wall_per_step = wall_s / steps
    top = sorted(by_name.items(), key=lambda item: -sum(item[1]))[:15]
    return {
        "wall_s_per_step": wall_per_step,
        "gpu": {
            "busy_s_per_step": busy * per_step,
            "busy_fraction": busy * per_step / wall_per_step,
            "compute_s_per_step": compute_busy * per_step,
            "communication_s_per_step": _union_us(communication) * per_step,
            # Communication during which no compute kernel ran: the part a faster link (or better overlap) saves.
            "communication_exposed_s_per_step": (busy - compute_busy) * per_step,
            "idle_s_per_step": wall_per_step - busy * per_step,
            "streams": {stream: _union_us(spans) * per_step for stream, spans in sorted(by_stream.items())},
        },
        "top_kernels": [{"name": name[:160], "s_per_step": sum(durations) * per_step,
                         "calls_per_step": len(durations) / steps} for name, durations in top],
    }


class StepProfiler:
    """Starts before step `start_step` and stops after `steps` steps; a no-op when `start_step` is 0."""

    def __init__(self, config: ProfilingConfig, out_dir: Path, rank: int, device: torch.device):
        self.config, self.out_dir, self.rank, self.device = config, Path(out_dir), rank, device
        self._profiler = None
        self._started = 0.0

    @property
    def last_step(self) -> int:
        return self.config.start_step + self.config.steps - 1

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def before_step(self, steps_done: int) -> None:
        if not self.config.start_step or steps_done + 1 != self.config.start_step:
            return
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        self._synchronize()
        self._profiler = profile(activities=activities)
        self._profiler.__enter__()
        self._started = time.perf_counter()

    def after_step(self, steps_done: int) -> dict | None:
        """Returns the summary once the last profiled step is done."""
        if self._profiler is None or steps_done != self.last_step:
            return None
        self._synchronize()
        wall_s = time.perf_counter() - self._started
        self._profiler.__exit__(None, None, None)
        profiler, self._profiler = self._profiler, None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        stem = f"rank{self.rank}"
        trace_path = self.out_dir / f"{stem}.trace.json"
        profiler.export_chrome_trace(str(trace_path))
        trace = json.loads(trace_path.read_text())
        summary = {"rank": self.rank, "steps": [self.config.start_step, self.last_step],
                   **summarize_trace(trace, wall_s, self.config.steps)}
        if self.config.trace:
            with trace_path.open("rb") as src, gzip.open(f"{trace_path}.gz", "wb") as dst:
                shutil.copyfileobj(src, dst)
        os.remove(trace_path)
        table = profiler.key_averages().table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=80)
        (self.out_dir / f"{stem}.cpu_ops.txt").write_text(table)
        (self.out_dir / f"{stem}.summary.json").write_text(json.dumps(summary, indent=1))
        return summary
