"""What the trainer reports, and where: a small sink interface plus the run directory's own files.

The engine knows nothing of MLflow or Prefect: it calls `MetricsSink` methods, and the orchestration layer
adds an MLflow sink behind the same interface. The run directory always gets:
  latest.json    the current state, rewritten atomically every step (a reader never sees half a file)
  metrics.jsonl  one line per logged step, the history behind plots
  events.jsonl   skipped steps, loss spikes, checkpoints, resumes, resets
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import deque
from pathlib import Path
from typing import Protocol

PEAK_BF16_TFLOPS = {  # dense bf16 tensor-core peaks, for MFU
    "H100": 989.0, "H200": 989.0, "A100": 312.0, "RTX 4090": 165.2, "L40S": 362.0, "A6000": 154.8,
}


def peak_tflops(device_name: str | None) -> float | None:
    if not device_name:
        return None
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in device_name:
            return value
    return None


class MetricsSink(Protocol):
    def log_metrics(self, step: int, metrics: dict[str, float]) -> None: ...
    def log_event(self, step: int, kind: str, details: dict) -> None: ...
    def close(self) -> None: ...


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


class RunDirSink:
    """metrics.jsonl and events.jsonl in the run directory (rank 0 only)."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self._metrics = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        self._events = open(self.run_dir / "events.jsonl", "a", buffering=1)

    def log_metrics(self, step, metrics):
        self._metrics.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")

    def log_event(self, step, kind, details):
        self._events.write(json.dumps({"step": step, "time": time.time(), "event": kind, **details}, default=str) + "\n")

    def close(self):
        self._metrics.close()
        self._events.close()


class SpikeDetector:
    """Flags a loss above the rolling mean + k·σ of the last `window` losses (once the window is full)."""

    def __init__(self, window: int, sigma: float):
        self.losses: deque[float] = deque(maxlen=window)
        self.sigma = sigma

    def check(self, loss: float) -> dict | None:
        spike = None
        if len(self.losses) == self.losses.maxlen:
            mean = sum(self.losses) / len(self.losses)
            std = math.sqrt(sum((x - mean) ** 2 for x in self.losses) / len(self.losses))
            if loss > mean + self.sigma * max(std, 1e-6):
                spike = {"loss": loss, "rolling_mean": mean, "rolling_std": std}
        self.losses.append(loss)
        return spike

    def state_dict(self) -> dict:
        return {"losses": list(self.losses)}

    def load_state_dict(self, state: dict) -> None:
        self.losses.extend(state.get("losses", []))


class ProgressLine:
    """A tqdm-style line on rank 0: a bar when attached to a terminal, plain lines when piped (logs)."""

    def __init__(self, target_step: int, stream=None):
        self.target_step = target_step
        self.stream = stream or sys.stderr
        self.interactive = self.stream.isatty()

    def update(self, step: int, metrics: dict) -> None:
        fraction = min(1.0, step / max(1, self.target_step))
        bar = "█" * int(fraction * 20) + "░" * (20 - int(fraction * 20))
        parts = [f"step {step}/{self.target_step} {bar} {fraction:6.1%}", f"loss {metrics['loss']:.4f}",
                 f"lr {metrics['lr']:.2e}", f"gnorm {metrics['grad_norm']:.3f}",
                 f"{metrics['tokens_per_s']:,.0f} tok/s"]
        if metrics.get("mfu") is not None:
            parts.append(f"mfu {metrics['mfu']:.1%}")
        parts.append(f"eta {format_duration(metrics.get('eta_s'))}")
        line = " | ".join(parts)
        if self.interactive:
            self.stream.write("\r" + line + "\x1b[K")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.interactive:
            self.stream.write("\n")


def format_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"
