"""What the trainer reports, and where: a small sink interface, the run directory's own files, the progress line.

The engine knows nothing of MLflow or Prefect: it calls `MetricsSink` methods, and the orchestration layer
adds an MLflow sink behind the same interface. Rank 0 always writes, in the run directory (`genesis.run_dir`):
  metrics.jsonl  one line per logged step, the history behind plots
  events.jsonl   skipped steps, loss spikes, checkpoints, resumes, resets
The status file `latest.json` and the step's figures (throughput, MFU, ETA) come from the trainer's callbacks
(`callbacks.py`).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Protocol

from genesis.run_dir import RunDir


class MetricsSink(Protocol):
    def log_metrics(self, step: int, metrics: dict[str, float]) -> None: ...
    def log_event(self, step: int, kind: str, details: dict) -> None: ...
    def close(self) -> None: ...


class RunDirSink:
    """metrics.jsonl and events.jsonl in the run directory (rank 0 only)."""

    def __init__(self, run_dir: Path):
        run = RunDir(Path(run_dir))
        self._metrics = open(run.metrics, "a", buffering=1)
        self._events = open(run.events, "a", buffering=1)

    def log_metrics(self, step, metrics):
        self._metrics.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")

    def log_event(self, step, kind, details):
        self._events.write(json.dumps({"step": step, "time": time.time(), "event": kind, **details}, default=str) + "\n")

    def close(self):
        self._metrics.close()
        self._events.close()


class ProgressLine:
    """A tqdm-style line on rank 0 for every logged step: a bar when attached to a terminal, plain lines when
    piped (logs). A sink, so it shows exactly what is logged."""

    def __init__(self, target_step: int, stream=None):
        self.target_step = target_step
        self.stream = stream or sys.stderr
        self.interactive = self.stream.isatty()

    def log_metrics(self, step: int, metrics: dict) -> None:
        if "loss" not in metrics:
            if "cooldown/loss" not in metrics:
                return  # a milestone's validation after its cool-down: in the files, not on the line
            # A milestone cooled off the trunk (optimizer.cooldown=fork): its own line, the trunk's bar stays put.
            line = (f"cool-down to milestone, step {step} | loss {metrics['cooldown/loss']:.4f} | "
                    f"lr {metrics['cooldown/lr']:.2e} | gnorm {metrics['cooldown/grad_norm']:.3f}")
        else:
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

    def log_event(self, step: int, kind: str, details: dict) -> None:
        pass

    def close(self) -> None:
        if self.interactive:
            self.stream.write("\n")


def format_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"
