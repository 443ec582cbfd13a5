"""The trainer's extras, each a small callback around its loop (in the style of OLMo-core's trainer callbacks):
profiling, throughput and MFU, the non-finite and spike policy, per-source evaluation, each rank's GPU, and the
status file.

The loop (`trainer.py`) calls each hook on every rank, in the order of its callback list. Per optimizer step:
  on_step_start        before the step's micro-batches
  veto_update          once the step's loss and gradient norm are known (finite), before the optimizer step:
                       return a reason to skip this update (the same on every rank), or None
  on_step_metrics      after the update, with the step's metrics (a dict): add figures to it, report events,
                       or stop the run by raising (`NonFiniteStop`); runs before the metrics are logged
  on_step_end          after the metrics are logged and any checkpoint is saved or started
and once each: on_fit_start, before the first step; on_fit_end, with the run's status ('completed', 'paused',
'stopped_by_signal' or 'stopped_nonfinite'); on_checkpoint_saved, on rank 0 once a checkpoint is complete (on
the saving thread for an asynchronous save). A hook that runs a collective must run on every rank.

A callback whose state must survive a resume names a `state_key`: its `state_dict()` is saved under that key in
each rank's trainer state (`trainer/rank_N.pt` of a checkpoint) and handed back to `load_state_dict`.
"""

from __future__ import annotations

import math
import time
from collections import deque
from pathlib import Path

import torch
import torch.distributed as dist

from genesis.config import EvalConfig, StabilityConfig, TrainConfig
from genesis.run_dir import CheckpointRef, RunDir, write_json_atomic
from genesis_model.distributed import DistInfo
from genesis_model.gpu_stats import FIGURES, GpuReader, readings_to_metrics
from genesis_model.profiling import StepProfiler


class Callback:
    """A trainer extra; every hook does nothing unless overridden. `trainer` is the calling `Trainer`."""

    state_key: str | None = None

    def on_fit_start(self, trainer) -> None:
        pass

    def on_step_start(self, trainer) -> None:
        pass

    def veto_update(self, trainer, loss: float, grad_norm: float) -> str | None:
        return None

    def loss_threshold(self) -> float | None:
        """A loss above which weights are unsound (the spike threshold), if this callback knows one."""
        return None

    def on_step_metrics(self, trainer, metrics: dict) -> None:
        pass

    def on_step_end(self, trainer, metrics: dict) -> None:
        pass

    def on_checkpoint_saved(self, trainer, ref: CheckpointRef, seconds: float) -> None:
        pass

    def on_cooldown_step(self, trainer, milestone: int, done: int, steps: int, metrics: dict) -> None:
        """After each update of a milestone's cool-down off the trunk (`done` of `steps`; `cooldown/` metrics)."""

    def on_fit_end(self, trainer, status: str) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class NonFiniteStop(RuntimeError):
    """K updates in a row were skipped for non-finite loss or gradients."""


def standard_callbacks(config: TrainConfig, dist_info: DistInfo, num_params: int,
                       host_group: dist.ProcessGroup | None = None) -> list[Callback]:
    """The extras every training run has. `host_group`: a gloo group of all ranks for small host-side
    reductions (None with one rank)."""
    run_dir = RunDir(Path(config.run_dir))
    callbacks: list[Callback] = [
        Profile(StepProfiler(config.profiling, run_dir.root / "profile", dist_info.rank, dist_info.device)),
        Throughput(config, dist_info, num_params, host_group),
        Stability(config.stability),
        Evaluation(config.eval),
    ]
    if dist_info.device.type == "cuda":
        callbacks.append(GpuStats(dist_info, host_group))
    if dist_info.is_main:
        # NOTE: first, so it holds the step's metrics before a later callback may stop the run: a run stopped
        # for non-finite steps shows the figures of the step that stopped it.
        callbacks.insert(0, StatusFile(run_dir, config.max_steps))
    return callbacks


# -------------------------------------------------------------------------------------------------------------


class Profile(Callback):
    """`profiling.start_step`: profile the configured steps (`profiling.py`), then report their summary."""

    def __init__(self, profiler: StepProfiler):
        self.profiler = profiler

    def on_step_start(self, trainer) -> None:
        self.profiler.before_step(trainer.step)

    def on_step_metrics(self, trainer, metrics: dict) -> None:
        profile = self.profiler.after_step(trainer.step)
        if profile:
            gpu = profile["gpu"] or {}
            trainer.event("profiled", steps=profile["steps"], wall_s_per_step=round(profile["wall_s_per_step"], 4),
                          **{key: round(value, 4) for key, value in gpu.items() if isinstance(value, float)})


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


class Throughput(Callback):
    """Tokens per second, MFU, time left and memory, added to every step's metrics."""

    def __init__(self, config: TrainConfig, dist_info: DistInfo, num_params: int,
                 host_group: dist.ProcessGroup | None = None):
        self.dist, self.host_group = dist_info, host_group
        self.flops_per_token = 6 * num_params + 12 * config.model.n_layers * config.model.dim * config.window
        device_name = torch.cuda.get_device_name(dist_info.device) if dist_info.device.type == "cuda" else None
        self.peak_tflops = peak_tflops(device_name)
        self._step_time_ema: float | None = None

    def on_step_metrics(self, trainer, metrics: dict) -> None:
        elapsed = metrics["step_time_s"]
        # The first steps include compilation; the EMA forgets them quickly.
        self._step_time_ema = elapsed if self._step_time_ema is None else 0.9 * self._step_time_ema + 0.1 * elapsed
        tokens_per_s = trainer.tokens_per_step / elapsed
        metrics["tokens_per_s"] = tokens_per_s
        metrics["mfu"] = (self.flops_per_token * tokens_per_s / (self.peak_tflops * 1e12 * self.dist.world_size)
                          if self.peak_tflops else None)
        metrics["eta_s"] = self._step_time_ema * (trainer.config.max_steps - trainer.step)
        metrics["memory_gib"] = self.memory_gib(all_ranks=trainer.log_due())

    def memory_gib(self, all_ranks: bool) -> float:
        """This rank's memory (GPU: peak allocated by PyTorch; CPU: resident set now), or with `all_ranks` the
        largest over ranks: the figure that must fit each GPU. Every rank must make the same `all_ranks` call."""
        if self.dist.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.dist.device) / 2**30
        else:
            import psutil

            peak = psutil.Process().memory_info().rss / 2**30
        if all_ranks and self.dist.world_size > 1:
            value = torch.tensor([peak], dtype=torch.float64)
            dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.host_group)
            peak = float(value)
        return peak


class SpikeDetector:
    """Flags a loss above the rolling mean + k·σ of the last `window` losses (once the window is full)."""

    def __init__(self, window: int, sigma: float):
        self.losses: deque[float] = deque(maxlen=window)
        self.sigma = sigma

    def statistics(self) -> tuple[float, float] | None:
        if len(self.losses) < self.losses.maxlen:
            return None
        mean = sum(self.losses) / len(self.losses)
        return mean, math.sqrt(sum((x - mean) ** 2 for x in self.losses) / len(self.losses))

    def threshold(self) -> float | None:
        stats = self.statistics()
        return None if stats is None else stats[0] + self.sigma * max(stats[1], 1e-6)

    def spike(self, loss: float) -> dict | None:
        """The spike's description if `loss` is one (the window is not changed)."""
        threshold = self.threshold()
        if threshold is None or loss <= threshold:
            return None
        mean, std = self.statistics()
        return {"loss": loss, "rolling_mean": mean, "rolling_std": std}

    def check(self, loss: float) -> dict | None:
        """`spike(loss)`, then `loss` joins the window."""
        spike = self.spike(loss)
        self.losses.append(loss)
        return spike

    def state_dict(self) -> dict:
        return {"losses": list(self.losses)}

    def load_state_dict(self, state: dict) -> None:
        self.losses.extend(state.get("losses", []))


class Stability(Callback):
    """What a bad step means (`stability.*`). The trainer skips any update whose loss or gradient norm is not
    finite, and counts it. A finite loss above the rolling mean + k·σ is a spike; `spike_policy` says what follows:
    'record' (an event; the update is applied and the run counts as unhealthy until a normal loss), 'skip' (the
    update is not made; the loss stays out of the window) or 'rollback' (the newest complete checkpoint is
    reloaded and the data goes on after the spike). K non-finite steps in a row stop the run without saving, so
    the last good checkpoint stays newest, unless 'rollback' has rollbacks left. While unhealthy, no checkpoint is
    written (`Trainer.unfit_to_save`)."""

    state_key = "spikes"

    def __init__(self, config: StabilityConfig):
        self.config = config
        self.spikes = SpikeDetector(config.spike_window, config.spike_sigma)

    def veto_update(self, trainer, loss: float, grad_norm: float) -> str | None:
        if self.config.spike_policy == "skip" and self.spikes.spike(loss):
            return "loss_spike"
        return None

    def loss_threshold(self) -> float | None:
        return self.spikes.threshold()

    def on_step_metrics(self, trainer, metrics: dict) -> None:
        health = trainer.health
        reason = metrics.get("skip_reason")
        if reason == "nonfinite":
            health |= {"healthy": False, "reason": f"{trainer.consecutive_nonfinite} non-finite step(s) in a row"}
            trainer.event("nonfinite_step_skipped", loss=metrics["loss"], grad_norm=metrics["grad_norm"],
                          consecutive=trainer.consecutive_nonfinite, total=trainer.nonfinite_skipped)
            if trainer.consecutive_nonfinite >= self.config.max_consecutive_nonfinite:
                if self.config.spike_policy == "rollback" and trainer.rollback("nonfinite_streak"):
                    return
                raise NonFiniteStop(
                    f"run stopped at step {trainer.step}: {trainer.consecutive_nonfinite} non-finite steps in a "
                    f"row; the last good checkpoint is kept; lower the lr or inspect the data, then --resume auto")
        elif reason == "loss_spike":
            health["spikes_skipped"] += 1
            trainer.event("loss_spike", action="update_skipped", **self.spikes.spike(metrics["loss"]))
        else:
            spike = self.spikes.check(metrics["loss"])
            if spike is None:
                health |= {"healthy": True, "reason": None}
            elif self.config.spike_policy == "rollback":
                trainer.event("loss_spike", action="rollback", **spike)
                if not trainer.rollback("loss_spike"):
                    health |= {"healthy": False, "reason": f"loss spike at step {trainer.step} ({spike['loss']:.4g})"}
            else:
                trainer.event("loss_spike", action="recorded", **spike)
                health |= {"healthy": False, "reason": f"loss spike at step {trainer.step} ({spike['loss']:.4g})"}
        metrics |= {key: health[key] for key in ("spikes_skipped", "checkpoints_withheld", "rollbacks")}

    def state_dict(self) -> dict:
        return self.spikes.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.spikes.losses.clear()
        self.spikes.load_state_dict(state)


class Evaluation(Callback):
    """Every `eval.every` steps: the mean loss on each source's held-out documents (and their mean, 'all'),
    in the step's metrics as `val_loss/<source>` and in `trainer.last_val`."""

    def __init__(self, config: EvalConfig):
        self.config = config
        self._batches = None

    def on_step_metrics(self, trainer, metrics: dict) -> None:
        if self.config.every and trainer.step % self.config.every == 0:
            trainer.last_val = self.evaluate(trainer)
            metrics |= {f"val_loss/{name}": value for name, value in trainer.last_val.items()}

    @torch.no_grad()
    def evaluate(self, trainer) -> dict[str, float]:
        if self._batches is None:
            self._batches = trainer.loader.validation_batches(self.config.batches_per_source)
        device = trainer.dist.device
        results = {}
        with trainer.evaluating():
            for name, batches in self._batches.items():
                total = torch.zeros((), device=device)
                for inputs, targets in batches:
                    total += trainer.model(inputs.to(device), targets.to(device))
                results[name] = float(trainer.all_reduce_mean(total / len(batches)))
        if results:
            results["all"] = sum(results.values()) / len(results)
        return results


class GpuStats(Callback):
    """Each rank's GPU (utilisation, memory in use, temperature, power; `gpu_stats.py`) in the metrics of every
    logged step, gathered to rank 0. Every rank makes the same gather on the same steps."""

    def __init__(self, dist_info: DistInfo, host_group: dist.ProcessGroup | None = None):
        self.dist, self.host_group = dist_info, host_group
        self.reader = GpuReader(dist_info.device)

    def on_fit_start(self, trainer) -> None:
        if self.reader.unavailable and self.dist.is_main:
            trainer.event("gpu_stats_unavailable", reason=self.reader.unavailable)

    def on_step_metrics(self, trainer, metrics: dict) -> None:
        if not trainer.log_due():
            return
        reading = torch.tensor(self.reader.read(), dtype=torch.float64)
        if self.dist.world_size > 1:
            gathered = [torch.empty(len(FIGURES), dtype=torch.float64) for _ in range(self.dist.world_size)]
            dist.all_gather(gathered, reading, group=self.host_group)
        else:
            gathered = [reading]
        if self.dist.is_main:
            metrics.update(readings_to_metrics([row.tolist() for row in gathered]))


class StatusFile(Callback):
    """`latest.json` (rank 0): the run's current state, rewritten atomically after every step and at the end."""

    def __init__(self, run_dir: RunDir, target_step: int):
        self.run_dir, self.target_step = run_dir, target_step
        self._last_milestone: Path | None = None
        self._metrics: dict | None = None

    def on_fit_start(self, trainer) -> None:
        milestones = self.run_dir.milestones()
        self._last_milestone = milestones[-1] if milestones else None
        self.write(trainer, "training")

    def on_step_metrics(self, trainer, metrics: dict) -> None:
        self._metrics = metrics

    def on_step_end(self, trainer, metrics: dict) -> None:
        self.write(trainer, "training", metrics)

    def on_checkpoint_saved(self, trainer, ref: CheckpointRef, seconds: float) -> None:
        if ref.milestone:
            self._last_milestone = ref.path

    def on_cooldown_step(self, trainer, milestone: int, done: int, steps: int, metrics: dict) -> None:
        # Hours at genesis-1b (4,000 updates): the file says what runs instead of freezing at the fork's step.
        self.write(trainer, "cooling_down", {**metrics, "cooldown": {"milestone": milestone, "done": done,
                                                                     "steps": steps}})

    def on_fit_end(self, trainer, status: str) -> None:
        self.write(trainer, status, self._metrics if status == "stopped_nonfinite" else None)

    def write(self, trainer, status: str, metrics: dict | None = None) -> None:
        last = trainer.checkpointer.last_saved
        write_json_atomic(self.run_dir.latest, {
            "status": status,
            "step": trainer.step,
            "target_step": self.target_step,
            "tokens_seen": trainer.tokens_seen,
            "tokens_per_step": trainer.tokens_per_step,
            "world_size": trainer.dist.world_size,
            "nonfinite_skipped": trainer.nonfinite_skipped,
            "health": dict(trainer.health),
            # Passes over each source's documents so far (kept when the run ends, unlike the step's figures).
            "repetition": {name: round(value, 6) for name, value in trainer.loader.repetition().items()},
            "last_checkpoint": str(last.path) if last else None,
            "last_milestone": str(self._last_milestone) if self._last_milestone else None,
            "val_loss": trainer.last_val,
            "updated": time.time(),
            **{key: value for key, value in (metrics or {}).items() if key != "skip_reason"},
        })
