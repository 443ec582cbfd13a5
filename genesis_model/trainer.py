"""The pretraining loop: accumulate, clip, step (or skip), report, evaluate, checkpoint.

The trainer owns the loop and the run's counters; the model and optimizer come built and parallelized
(`train.py` assembles everything in order); checkpoints go through `Checkpointer`; everything reported goes
through metrics sinks. Stability rules:
  * a non-finite loss or gradient norm skips the update (all ranks agree: both are all-reduced) and is
    counted; K skipped steps in a row stop the run without saving, so the last good checkpoint stays newest;
  * a loss above the rolling mean + k·σ is recorded as a spike event (training continues).
"""

from __future__ import annotations

import math
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

from genesis.config import TrainConfig
from genesis_model.checkpoint import Checkpointer, CheckpointRef, capture_rng_state, restore_rng_state
from genesis_model.distributed import DistInfo, exit_if_longer_than
from genesis_model.loader import TokenLoader
from genesis_model.metrics import MetricsSink, ProgressLine, SpikeDetector, peak_tflops, write_json_atomic
from genesis_model.optim import lr_at
from genesis_model.parallelize import compute_copies
from genesis_model.profiling import StepProfiler

# Testing aid: comma-separated steps at which rank 0's loss is replaced by NaN (a real fault's stand-in).
INJECT_NAN_ENV = "GENESIS_INJECT_NAN_STEPS"


class NonFiniteStop(RuntimeError):
    """K updates in a row were skipped for non-finite loss or gradients."""


class Trainer:
    def __init__(self, config: TrainConfig, dist_info: DistInfo, model, optimizer, loader: TokenLoader,
                 checkpointer: Checkpointer, sinks: list[MetricsSink], run_meta: dict, num_params: int,
                 host_group: dist.ProcessGroup | None = None):
        """`host_group`: a gloo group of all ranks for small host-side reductions (None with one rank)."""
        self.config, self.dist = config, dist_info
        self.host_group = host_group
        self.model, self.optimizer, self.loader = model, optimizer, loader
        self.checkpointer, self.sinks, self.run_meta = checkpointer, sinks, run_meta
        self.run_dir = Path(config.run_dir)
        self.step = 0
        self.tokens_seen = 0
        self.nonfinite_skipped = 0
        self.consecutive_nonfinite = 0
        self.spikes = SpikeDetector(config.stability.spike_window, config.stability.spike_sigma)
        self.tokens_per_step = config.micro_batch_size * config.window * config.grad_accum_steps * dist_info.world_size
        self._fold_gradients = config.grad_accum_steps > 1 and hasattr(optimizer, "fold_gradients")
        # Gradients land on these too (parallel.master_weights); fixed once attached, so looked up once.
        self._compute_copies = list(compute_copies(model).values())
        self.flops_per_token = 6 * num_params + 12 * config.model.n_layers * config.model.dim * config.window
        device_name = torch.cuda.get_device_name(dist_info.device) if dist_info.device.type == "cuda" else None
        self.peak_tflops = peak_tflops(device_name)
        self.progress = ProgressLine(config.max_steps) if dist_info.is_main else None
        self.last_val: dict[str, float] = {}
        self._step_time_ema: float | None = None
        self._stop_signal: int | None = None
        self._inject_nan = {int(s) for s in os.environ.get(INJECT_NAN_ENV, "").split(",") if s.strip()}
        self._val_batches = None
        self.profiler = StepProfiler(config.profiling, self.run_dir / "profile", dist_info.rank, dist_info.device)
        self._fsdp = isinstance(model, FSDPModule)
        self._accumulate_unsharded = (self._fsdp and dist_info.world_size > 1 and config.grad_accum_steps > 1
                                      and config.parallel.accumulate_unsharded)
        if self._accumulate_unsharded:
            # NOTE: with resharding after forward, every micro-step all-gathers each block twice (forward and
            # backward): 2 × accumulation × 2 bytes × parameters per optimizer step, which over PCIe, or any
            # link slower than the GPU, dominates the step. Kept unsharded, the weights are gathered once per
            # optimizer step and the gradients reduced once (`train_step`).
            model.set_reshard_after_forward(False)

    # ---------------------------------------------------------------------------------------------------------
    # State

    def rank_state(self) -> dict:
        return {
            "loader": self.loader.state_dict(),
            "rng": capture_rng_state(),
            "spikes": self.spikes.state_dict(),
        }

    def checkpoint_meta(self) -> dict:
        return {
            **self.run_meta,
            "tokens_seen": self.tokens_seen,
            "nonfinite_skipped": self.nonfinite_skipped,
            "last_loss": self.spikes.losses[-1] if self.spikes.losses else None,
            "val_loss": self.last_val,
        }

    def restore(self, meta: dict, rank_state: dict) -> None:
        self.step = int(meta["step"])
        self.tokens_seen = int(meta["tokens_seen"])
        self.nonfinite_skipped = int(meta.get("nonfinite_skipped", 0))
        self.spikes.load_state_dict(rank_state.get("spikes", {}))
        if "loader" in rank_state:
            self.loader.load_state_dict(rank_state["loader"])
        if "rng" in rank_state:
            restore_rng_state(rank_state["rng"])

    # ---------------------------------------------------------------------------------------------------------
    # Reporting

    def event(self, kind: str, **details) -> None:
        if self.dist.is_main:
            for sink in self.sinks:
                sink.log_event(self.step, kind, details)

    def _on_checkpoint_saved(self, ref: CheckpointRef, seconds: float) -> None:
        self.event("checkpoint_saved", path=str(ref.path), milestone=ref.milestone, seconds=round(seconds, 3),
                   saved_step=ref.step)

    def _write_latest(self, status: str, metrics: dict | None = None) -> None:
        if not self.dist.is_main:
            return
        last = self.checkpointer.last_saved
        milestones = sorted((self.run_dir / "milestones").glob("step_*"))
        latest = {
            "status": status,
            "step": self.step,
            "target_step": self.config.max_steps,
            "tokens_seen": self.tokens_seen,
            "tokens_per_step": self.tokens_per_step,
            "world_size": self.dist.world_size,
            "nonfinite_skipped": self.nonfinite_skipped,
            "last_checkpoint": str(last.path) if last else None,
            "last_milestone": str(milestones[-1]) if milestones else None,
            "val_loss": self.last_val,
            "updated": time.time(),
            **(metrics or {}),
        }
        write_json_atomic(self.run_dir / "latest.json", latest)

    def _memory_gib(self, all_ranks: bool) -> float:
        """This rank's memory (GPU: peak allocated by PyTorch; CPU: resident set now), or with `all_ranks` the largest
        over ranks: the figure that must fit each GPU. Every rank must make the same `all_ranks` call."""
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

    # ---------------------------------------------------------------------------------------------------------
    # One optimizer step

    def _all_reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        # NOTE: SUM then divide, because gloo (CPU runs) has no AVG reduction.
        value = value.detach().float().clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value / self.dist.world_size

    def _next_micro_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        windows = self.loader.next_windows()
        if self.dist.device.type == "cuda":
            # NOTE: a copy from pageable host memory makes CUDA drain the stream before it starts (CUDA's "API
            # synchronization behavior"), so each micro-step waited for all queued GPU work and the CPU could never
            # run ahead: the GPU then idled while the CPU launched the next forward, most of all with FSDP's hooks
            # on several ranks (profiled on 2 H200s, BENCHMARKS.md). From pinned memory the copy is asynchronous;
            # the caching host allocator keeps the buffer until the copy is done.
            windows = windows.pin_memory()
        windows = windows.to(self.dist.device, non_blocking=True)
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()

    def train_step(self) -> dict:
        config = self.config
        lr = lr_at(self.step, config.optimizer, config.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=self.dist.device)
        for micro_step in range(config.grad_accum_steps):
            inputs, targets = self._next_micro_batch()
            # Reduce-scatter gradients only on the last micro-step; earlier ones accumulate locally. (A plain
            # one-rank model has nothing to reduce: its gradients simply accumulate.)
            if self._fsdp:
                last_micro_step = micro_step == config.grad_accum_steps - 1
                self.model.set_requires_gradient_sync(last_micro_step)
                if self._accumulate_unsharded:
                    self.model.set_reshard_after_backward(last_micro_step)
            loss = self.model(inputs, targets)
            if self.step + 1 in self._inject_nan and self.dist.is_main:
                loss = loss * float("nan")
            (loss / config.grad_accum_steps).backward()
            if self._fold_gradients:
                self.optimizer.fold_gradients()  # bf16 compute copies' gradients, summed over micro-steps in fp32
            loss_sum += loss.detach()

        grad_norm = torch.nn.utils.clip_grad_norm_([*self.model.parameters(), *self._compute_copies],
                                                   config.optimizer.grad_clip, foreach=True)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        loss_value = float(self._all_reduce_mean(loss_sum / config.grad_accum_steps))
        grad_norm_value = float(grad_norm)
        finite = math.isfinite(loss_value) and math.isfinite(grad_norm_value)
        if finite:
            staging_wait = self.checkpointer.wait_for_staging()  # an async save may still be copying weights
            if staging_wait:
                self.event("checkpoint_staging_wait", seconds=round(staging_wait, 3))
            self.optimizer.step()
            self.consecutive_nonfinite = 0
        else:
            self.nonfinite_skipped += 1
            self.consecutive_nonfinite += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += self.tokens_per_step
        return {"loss": loss_value, "lr": lr, "grad_norm": grad_norm_value, "finite": finite}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        if self._val_batches is None:
            self._val_batches = self.loader.validation_batches(self.config.eval.batches_per_source)
        self.model.eval()
        results = {}
        for name, batches in self._val_batches.items():
            total = torch.zeros((), device=self.dist.device)
            for inputs, targets in batches:
                total += self.model(inputs.to(self.dist.device), targets.to(self.dist.device))
            results[name] = float(self._all_reduce_mean(total / len(batches)))
        self.model.train()
        if self._accumulate_unsharded:
            # Weights gathered by these forwards stay unsharded (no resharding after forward); free them, and
            # hand the optimizer and the checkpointer the sharded parameters again.
            self.model.reshard()
        if results:
            results["all"] = sum(results.values()) / len(results)
        return results

    # ---------------------------------------------------------------------------------------------------------
    # The loop

    def _checkpoint_due(self) -> tuple[bool, bool]:
        """(save now, as a milestone)."""
        ckpt = self.config.checkpoint
        if ckpt.milestone_every and self.step % ckpt.milestone_every == 0:
            return True, True
        if ckpt.save_every and self.step % ckpt.save_every == 0:
            return True, False
        return False, False

    def save(self, milestone: bool = False) -> float:
        def save_checkpoint() -> float:
            return self.checkpointer.save(self.step, self.model, self.optimizer, self.rank_state(),
                                          self.checkpoint_meta(), milestone=milestone)

        if self.dist.world_size == 1:
            return save_checkpoint()
        # A save is where every rank waits for every other (DCP plans and commits collectively): a rank stuck
        # or gone shows up here first, and the deadline turns it into one line instead of a hang or an abort.
        timeout = self.config.parallel.nccl_timeout_s
        message = (f"error: rank {self.dist.rank}: the checkpoint save at step {self.step} did not finish within "
                   f"parallel.nccl_timeout_s={timeout} s: another rank is stuck or gone; complete checkpoints "
                   f"are kept: fix the cause, then --resume auto")
        with exit_if_longer_than(timeout, message):
            return save_checkpoint()

    def _handle_signal(self, signum, frame) -> None:
        self._stop_signal = signum

    def fit(self, stop_at_step: int | None = None) -> str:
        """Train to `max_steps` (or pause after `stop_at_step`, with the schedule still that of max_steps).
        Returns 'completed', 'paused' or 'stopped_by_signal'; raises NonFiniteStop after K skipped steps
        in a row."""
        config = self.config
        self.checkpointer.on_saved = self._on_checkpoint_saved
        previous_handlers = {sig: signal.signal(sig, self._handle_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        self.model.train()
        status = "completed"
        just_saved = False
        try:
            self._write_latest("training")
            while self.step < config.max_steps:
                self.profiler.before_step(self.step)
                started = time.perf_counter()
                result = self.train_step()
                elapsed = time.perf_counter() - started
                profile = self.profiler.after_step(self.step)
                if profile:
                    gpu = profile["gpu"] or {}
                    self.event("profiled", steps=profile["steps"], wall_s_per_step=round(profile["wall_s_per_step"], 4),
                               **{key: round(value, 4) for key, value in gpu.items() if isinstance(value, float)})
                just_saved = False
                # The first steps include compilation; the EMA forgets them quickly.
                self._step_time_ema = elapsed if self._step_time_ema is None else 0.9 * self._step_time_ema + 0.1 * elapsed
                tokens_per_s = self.tokens_per_step / elapsed
                log_now = self.step % config.log_every == 0 or self.step == config.max_steps
                metrics = {
                    "loss": result["loss"], "lr": result["lr"], "grad_norm": result["grad_norm"],
                    "tokens_per_s": tokens_per_s, "tokens_seen": self.tokens_seen, "step_time_s": elapsed,
                    "mfu": (self.flops_per_token * tokens_per_s / (self.peak_tflops * 1e12 * self.dist.world_size)
                            if self.peak_tflops else None),
                    "eta_s": self._step_time_ema * (config.max_steps - self.step),
                    "memory_gib": self._memory_gib(all_ranks=log_now),
                    "skipped": not result["finite"],
                }
                if not result["finite"]:
                    self.event("nonfinite_step_skipped", loss=result["loss"], grad_norm=result["grad_norm"],
                               consecutive=self.consecutive_nonfinite, total=self.nonfinite_skipped)
                    if self.consecutive_nonfinite >= config.stability.max_consecutive_nonfinite:
                        self._write_latest("stopped_nonfinite", metrics)
                        raise NonFiniteStop(
                            f"run stopped at step {self.step}: {self.consecutive_nonfinite} non-finite steps in a row; "
                            f"the last good checkpoint is kept; lower the lr or inspect the data, then --resume auto"
                        )
                else:
                    spike = self.spikes.check(result["loss"])
                    if spike:
                        self.event("loss_spike", **spike)
                if config.eval.every and self.step % config.eval.every == 0:
                    self.last_val = self.evaluate()
                    metrics |= {f"val_loss/{name}": value for name, value in self.last_val.items()}
                if self.dist.is_main:
                    if log_now:
                        for sink in self.sinks:
                            sink.log_metrics(self.step, {k: v for k, v in metrics.items() if v is not None})
                        self.progress.update(self.step, metrics)
                due, milestone = self._checkpoint_due()
                if due:
                    blocked = self.save(milestone=milestone)
                    self.event("checkpoint_blocked", seconds=round(blocked, 3), milestone=milestone,
                               async_save=self.checkpointer.async_save)
                    just_saved = True
                self._write_latest("training", metrics)
                if self._stop_signal is not None:
                    status = "stopped_by_signal"
                    break
                if stop_at_step is not None and self.step >= stop_at_step:
                    status = "paused"
                    break
            if not just_saved and (config.checkpoint.save_at_end or status != "completed"):
                self.save(milestone=False)
            self.checkpointer.wait()
            self._write_latest(status)
            self.event("run_finished", status=status)
            return status
        finally:
            self.checkpointer.close()
            if self.progress:
                self.progress.close()
            for sig, handler in previous_handlers.items():
                signal.signal(sig, handler)
