"""The pretraining loop: accumulate, clip, step (or skip), report, checkpoint.

The trainer owns the loop, the run's counters and its checkpoints. The model, optimizer and loader come built,
and laid out by one `ParallelPlan` (`build.py`), which also decides how each micro-step treats FSDP's resharding
and gradient sync (`train_step`). A non-finite loss or gradient norm skips the update (all ranks agree: both are
all-reduced) and is counted. What is reported goes through metrics sinks; the extras around the loop (profiling,
throughput, what to do about bad steps, evaluation, the status file) are callbacks (`callbacks.py`).
"""

from __future__ import annotations

import math
import os
import signal
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from genesis.config import TrainConfig
from genesis_model.callbacks import Callback, Evaluation, NonFiniteStop
from genesis_model.checkpoint import Checkpointer, CheckpointRef, capture_rng_state, restore_rng_state
from genesis_model.distributed import DistInfo, exit_if_longer_than
from genesis_model.loader import TokenLoader
from genesis_model.metrics import MetricsSink
from genesis_model.optim import cooldown_lr, cooldown_steps, forks_cooldowns, lr_at, rewarm_at
from genesis_model.parallelize import ParallelPlan, compute_copies
from genesis_model.replica import Replica

# Testing aids (a real fault's stand-in): comma-separated steps at which rank 0's loss is replaced by NaN, or
# multiplied by 100 (a finite loss spike; once per step number, so a rollback past it does not meet it again).
INJECT_NAN_ENV = "GENESIS_INJECT_NAN_STEPS"
INJECT_SPIKE_ENV = "GENESIS_INJECT_SPIKE_STEPS"


class Trainer:
    def __init__(self, config: TrainConfig, dist_info: DistInfo, plan: ParallelPlan, model, optimizer,
                 loader: TokenLoader, checkpointer: Checkpointer, sinks: list[MetricsSink], run_meta: dict,
                 callbacks: Sequence[Callback] = (), replica: Replica | None = None):
        """`sinks`: where rank 0 logs metrics and events; `run_meta`: what every checkpoint's meta starts from;
        `replica`: the plain module the micro-steps run on instead of `model` (`parallel.micro_steps: replica`)."""
        self.config, self.dist, self.plan = config, dist_info, plan
        self.model, self.optimizer, self.loader = model, optimizer, loader
        self.replica = replica
        self.checkpointer, self.sinks, self.run_meta = checkpointer, sinks, run_meta
        self.callbacks = list(callbacks)
        # The run's record: restored on resume, saved in every checkpoint's meta.
        self.step = 0
        self.tokens_seen = 0
        self.nonfinite_skipped = 0
        self.consecutive_nonfinite = 0
        # Health (Stability's policy): updates vetoed by a callback, checkpoints withheld, rollbacks made.
        self.health = {"healthy": True, "reason": None, "spikes_skipped": 0, "checkpoints_withheld": 0,
                       "rollbacks": 0, "tokens_skipped": 0}
        self._owed_save: bool | None = None  # a withheld save to make at the next healthy step (True: a milestone)
        self._cooldowns_withheld: set[int] = set()  # milestones whose cooled weights were unfit: not tried again
        self._sound_weight_norm: float | None = None  # of the weights last saved (or started from)
        self.last_loss: float | None = None  # of the last update made (a skipped step's loss is not finite)
        self.last_val: dict[str, float] = {}  # the last evaluation's losses (callbacks.Evaluation)
        self.tokens_per_step = config.micro_batch_size * config.window * config.grad_accum_steps * dist_info.world_size
        # Gradients land on these too (master weights); fixed once attached, so looked up once.
        self._compute_copies = list(compute_copies(model).values()) if plan.master_weights else []
        self._stop_signal: int | None = None
        self._inject_nan = {int(s) for s in os.environ.get(INJECT_NAN_ENV, "").split(",") if s.strip()}
        self._inject_spike = {int(s) for s in os.environ.get(INJECT_SPIKE_ENV, "").split(",") if s.strip()}

    # ---------------------------------------------------------------------------------------------------------
    # State

    def rank_state(self) -> dict:
        state = {"loader": self.loader.state_dict(), "rng": capture_rng_state()}
        for callback in self.callbacks:
            if callback.state_key:
                state[callback.state_key] = callback.state_dict()
        return state

    def checkpoint_meta(self) -> dict:
        return {
            **self.run_meta,
            "tokens_seen": self.tokens_seen,
            "nonfinite_skipped": self.nonfinite_skipped,
            "health": dict(self.health),
            "last_loss": self.last_loss,
            "val_loss": self.last_val,
        }

    def restore(self, meta: dict, rank_state: dict) -> None:
        self.step = int(meta["step"])
        self.tokens_seen = int(meta["tokens_seen"])
        self.nonfinite_skipped = int(meta.get("nonfinite_skipped", 0))
        self.health |= {key: value for key, value in meta.get("health", {}).items() if key in self.health}
        self.last_loss = meta.get("last_loss")
        for callback in self.callbacks:
            if callback.state_key:
                callback.load_state_dict(rank_state.get(callback.state_key, {}))
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

    def log_due(self) -> bool:
        """Whether this step's metrics are logged (the same answer on every rank)."""
        return self.step % self.config.log_every == 0 or self.step == self.config.max_steps

    def _notify(self, hook: str, *args) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)

    def _on_checkpoint_saved(self, ref: CheckpointRef, seconds: float) -> None:
        self.event("checkpoint_saved", path=str(ref.path), milestone=ref.milestone, seconds=round(seconds, 3),
                   saved_step=ref.step, **self.checkpointer.last_phases)
        self._notify("on_checkpoint_saved", ref, seconds)

    # ---------------------------------------------------------------------------------------------------------
    # One optimizer step

    def all_reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
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

    def train_step(self, lr: float | None = None) -> dict:
        """One optimizer step over `grad_accum_steps` micro-batches; returns its loss, lr, gradient norm and
        whether the update was skipped. `lr`: this update's learning rate, if not the schedule's (a cool-down)."""
        config, plan = self.config, self.plan
        if lr is None:
            lr = lr_at(self.step, config.optimizer, config.max_steps, config.checkpoint.milestone_every)
            if (rewarm := rewarm_at(self.step, config.optimizer, config.max_steps, config.checkpoint.milestone_every)):
                self.event("lr_rewarm", **rewarm)  # a new cycle (after a milestone under wsd, or extended_from)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=self.dist.device)
        model = self.model
        if self.replica is not None:
            self.replica.pull_weights()  # the micro-steps run on the replica, without FSDP's hooks (replica.py)
            model = self.replica.module
        for micro_step in range(config.grad_accum_steps):
            inputs, targets = self._next_micro_batch()
            # Reduce-scatter gradients only on the last micro-step; earlier ones accumulate locally. (A plain
            # one-rank model has nothing to reduce: its gradients simply accumulate.)
            if plan.fsdp and self.replica is None:
                last_micro_step = micro_step == config.grad_accum_steps - 1
                self.model.set_requires_gradient_sync(last_micro_step)
                if plan.accumulate_unsharded:
                    self.model.set_reshard_after_backward(last_micro_step)
            loss = model(inputs, targets)
            if self.step + 1 in self._inject_nan and self.dist.is_main:
                loss = loss * float("nan")
            if self.step + 1 in self._inject_spike and self.dist.is_main:
                loss = loss * 100.0
                if micro_step == config.grad_accum_steps - 1:
                    self._inject_spike.discard(self.step + 1)
            (loss / config.grad_accum_steps).backward()
            if plan.fold_gradients:
                self.optimizer.fold_gradients()  # bf16 compute copies' gradients, summed over micro-steps in fp32
            if self.replica is not None:
                self.replica.fold_gradients()  # the same, for the replica's gradients
            loss_sum += loss.detach()
        if self.replica is not None:
            self.replica.push_gradients()  # averaged over the ranks, into FSDP's shards: the rest is unchanged

        grad_norm = torch.nn.utils.clip_grad_norm_([*self.model.parameters(), *self._compute_copies],
                                                   config.optimizer.grad_clip, foreach=True)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        loss_value = float(self.all_reduce_mean(loss_sum / config.grad_accum_steps))
        grad_norm_value = float(grad_norm)
        finite = math.isfinite(loss_value) and math.isfinite(grad_norm_value)
        # Every rank reaches the same verdict: the loss and gradient norm are all-reduced.
        skip_reason = None if finite else "nonfinite"
        for callback in self.callbacks if finite else ():
            skip_reason = skip_reason or callback.veto_update(self, loss_value, grad_norm_value)
        if skip_reason is None:
            self.optimizer.step()
            self.consecutive_nonfinite = 0
            self.last_loss = loss_value
        elif skip_reason == "nonfinite":
            self.nonfinite_skipped += 1
            self.consecutive_nonfinite += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += self.tokens_per_step
        return {"loss": loss_value, "lr": lr, "grad_norm": grad_norm_value, "skipped": skip_reason is not None,
                "skip_reason": skip_reason}

    @contextmanager
    def evaluating(self) -> Iterator[None]:
        """Forwards outside the training step (evaluation): eval mode, then back to training."""
        self.model.eval()
        try:
            yield
        finally:
            self.model.train()
            if self.plan.accumulate_unsharded or self.plan.replica:
                # Weights gathered by these forwards stay unsharded (no resharding after forward, or, beside a
                # replica, after the last unit's); free them, and hand the optimizer, the gradient clipping and the
                # checkpointer the sharded parameters again. NOTE: FSDPModule.reshard is not recursive: each unit.
                from torch.distributed.fsdp import FSDPModule

                for module in self.model.modules():
                    if isinstance(module, FSDPModule):
                        module.reshard()

    # ---------------------------------------------------------------------------------------------------------
    # Health: what is saved must be sound; what went wrong can be undone

    @torch.no_grad()
    def weight_norm(self) -> float:
        """The global L2 norm of the weights: squares of sharded parameters summed over the ranks' shards, of
        unsharded (replicated) ones counted once. NOTE: summed by hand, because FSDP leaves some parameters
        plain tensors beside the DTensors, and torch's total-norm helpers refuse the mix."""
        from torch.distributed.tensor import DTensor, Shard

        sharded = torch.zeros((), device=self.dist.device, dtype=torch.float64)
        replicated = torch.zeros((), device=self.dist.device, dtype=torch.float64)
        for param in self.model.parameters():
            if isinstance(param, DTensor) and any(isinstance(p, Shard) for p in param.placements):
                sharded += param.to_local().double().square().sum()
            else:
                local = param.to_local() if isinstance(param, DTensor) else param
                replicated += local.double().square().sum()
        if self.dist.world_size > 1:
            dist.all_reduce(sharded, op=dist.ReduceOp.SUM)
        return float((sharded + replicated).sqrt())

    @torch.no_grad()
    def probe_loss(self) -> float:
        """The loss of the current weights on the next micro-batch, forward only, the data position unchanged:
        what a checkpoint of these weights would resume into (the same value on every rank)."""
        position = self.loader.state_dict()
        inputs, targets = self._next_micro_batch()
        self.loader.load_state_dict(position)
        with self.evaluating():
            loss = self.model(inputs, targets)
        return float(self.all_reduce_mean(loss))

    def unfit_to_save(self) -> str | None:
        """Why the current weights must not become a checkpoint, or None. Unhealthy: inside a non-finite streak,
        after a spike whose update was applied, or (`stability.probe_before_save`) weights whose loss on the next
        batch is not finite, above the spike threshold, or above max_loss_factor·ln(vocab): a finite but
        destructive update shows there first."""
        if not self.health["healthy"]:
            return self.health["reason"]
        stability = self.config.stability
        norm = self.weight_norm()
        if self._sound_weight_norm is not None and not norm <= stability.max_weight_norm_growth * self._sound_weight_norm:
            return (f"the weights' norm is {norm:.4g}, more than {stability.max_weight_norm_growth:g}x the "
                    f"{self._sound_weight_norm:.4g} of the last sound weights")
        if not stability.probe_before_save:
            return None
        probe = self.probe_loss()
        limit = stability.max_loss_factor * math.log(self.config.model.vocab_size)
        for callback in self.callbacks:
            threshold = callback.loss_threshold()
            limit = min(limit, threshold) if threshold is not None else limit
        if not math.isfinite(probe) or probe > limit:
            return f"the weights' loss on the next batch is {probe:.4g} (limit {limit:.4g})"
        return None

    def rollback(self, reason: str) -> bool:
        """Reload the newest complete checkpoint's weights and optimizer (every rank) and go on with the data
        after the bad step: the data between is skipped, not replayed. False when no checkpoint or no rollback
        is left (the caller then stops the run)."""
        from genesis.run_dir import latest_checkpoint
        from genesis_model.parallelize import refresh_compute_copies

        self.checkpointer.wait()
        ref = latest_checkpoint(Path(self.config.run_dir))
        if ref is None or self.health["rollbacks"] >= self.config.stability.max_rollbacks:
            return False
        from_step, tokens_seen = self.step, self.tokens_seen
        position, health = self.loader.state_dict(), dict(self.health)
        meta, rank_state = self.checkpointer.load(ref.path, self.model, self.optimizer)
        refresh_compute_copies(self.model)
        self._sound_weight_norm = self.weight_norm()
        self.restore(meta, {key: value for key, value in rank_state.items() if key not in ("loader", "rng")})
        self.loader.load_state_dict(position)
        self.consecutive_nonfinite = 0
        self.health = health | {"rollbacks": health["rollbacks"] + 1, "healthy": True, "reason": None,
                                "tokens_skipped": health["tokens_skipped"] + tokens_seen - self.tokens_seen}
        self.event("rolled_back", reason=reason, from_step=from_step, to_step=self.step, checkpoint=str(ref.path),
                   tokens_skipped=tokens_seen - self.tokens_seen, rollbacks=self.health["rollbacks"])
        return True

    # ---------------------------------------------------------------------------------------------------------
    # The loop

    def _checkpoint_due(self) -> tuple[bool, bool]:
        """(save now, as a milestone). With forked cool-downs, the trunk at a milestone's step is saved as a
        rolling checkpoint (where it grows on from); the milestone itself is the cool-down's, and the trunk
        becomes the milestone only if no cool-down made it (its meta then has no `cooldown`)."""
        ckpt = self.config.checkpoint
        if ckpt.milestone_every and self.step % ckpt.milestone_every == 0:
            if forks_cooldowns(self.config.optimizer) and self._milestone_done(self.step):
                return True, False
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

    # ---------------------------------------------------------------------------------------------------------
    # Milestones cooled down off the trunk (optimizer.cooldown=fork)

    def _settle_checkpoints(self) -> None:
        """Every save finished and on disk for every rank: rank 0 completes an async save (its rename and
        marker) in a thread of its own, so without the barrier another rank could read the run directory
        before it and decide differently (one rank saving alone would hang the run)."""
        self.checkpointer.wait()
        if self.dist.world_size > 1:
            dist.barrier()

    def _milestone_done(self, step: int) -> bool:
        from genesis.run_dir import RunDir, is_complete, step_dir_name

        return is_complete(RunDir(Path(self.config.run_dir)).milestones_dir / step_dir_name(step))

    def _log_metrics(self, metrics: dict) -> None:
        """Rank 0 hands this step's metrics to every sink (metrics.jsonl, the console, MLflow's callback)."""
        if self.dist.is_main:
            for sink in self.sinks:
                sink.log_metrics(self.step, metrics)

    def _cooldown_due(self) -> int | None:
        """The milestone whose cool-down starts at this step, or None: under forked cool-downs, a milestone M
        (≤ max_steps) not yet made, with M − D ≤ step < M. Normally step = M − D; later only when the fork was
        put off (unsound weights at M − D) or the run resumed inside the window, and then the cool-down is
        shorter. Every rank reads the same milestone directory, so every rank decides alike."""
        config = self.config
        every = config.checkpoint.milestone_every
        if not forks_cooldowns(config.optimizer) or not every:
            return None
        milestone = (self.step // every + 1) * every
        if milestone > config.max_steps or milestone - self.step > cooldown_steps(config.optimizer, every):
            return None
        if milestone in self._cooldowns_withheld or self._milestone_done(milestone):
            return None
        return milestone

    def _cool_down(self, milestone: int) -> str:
        """Make `milestone` from the trunk at this step: save the trunk here (unless its newest checkpoint is
        this step's), train on with the LR falling to min_lr until `milestone`, evaluate, save that as the
        milestone, and load the trunk back. The cool-down reads the data the trunk reads next, so the milestone
        has seen exactly the trunk's first `milestone` steps. Returns 'made', 'put_off' (the trunk's weights are
        not fit to save; tried again next step), 'withheld' (the cooled weights were not; the trunk goes on) or
        'stopped' (a signal: the trunk's checkpoint here is where a resumed run forks again)."""
        from genesis.run_dir import latest_checkpoint
        from genesis_model.parallelize import refresh_compute_copies

        config, fork_step, fork_tokens = self.config, self.step, self.tokens_seen
        self._settle_checkpoints()
        newest = latest_checkpoint(Path(config.run_dir))
        if newest is None or newest.step != fork_step:
            if (withheld := self.unfit_to_save()):
                self.event("cooldown_put_off", milestone=milestone, reason=withheld)
                return "put_off"
            self._sound_weight_norm = self.weight_norm()
            self.save(milestone=False)
            self._settle_checkpoints()
        trunk = latest_checkpoint(Path(config.run_dir))
        steps, from_lr = milestone - fork_step, lr_at(fork_step, config.optimizer, config.max_steps)
        self.event("cooldown_started", milestone=milestone, from_step=fork_step, steps=steps, from_lr=from_lr,
                   trunk_checkpoint=str(trunk.path))
        started = time.perf_counter()
        outcome = "made"
        for index in range(steps):
            result = self.train_step(lr=cooldown_lr(index, steps, from_lr, config.optimizer))
            metrics = {f"cooldown/{key}": value for key, value in result.items()
                       if isinstance(value, (int, float)) and not isinstance(value, bool)}
            self._notify("on_cooldown_step", milestone, index + 1, steps, metrics)
            if self.log_due() or self.step == milestone:
                self._log_metrics(metrics)
            if self._stop_signal is not None:
                outcome = "stopped"
                break
        if outcome == "made":
            for callback in self.callbacks:
                if isinstance(callback, Evaluation):  # the milestone's own validation loss, whatever eval.every
                    self.last_val = callback.evaluate(self)
                    self._log_metrics({f"cooldown/val_loss/{name}": value for name, value in self.last_val.items()})
            withheld = self.unfit_to_save()
            if withheld:
                self.health["checkpoints_withheld"] += 1
                self.event("checkpoint_withheld", reason=withheld, milestone=True, cooldown=True)
                self._cooldowns_withheld.add(milestone)  # the trunk at the milestone's step becomes it instead
                outcome = "withheld"
            else:
                self.run_meta["cooldown"] = {"from_step": fork_step, "steps": steps, "from_lr": from_lr}
                try:
                    self.save(milestone=True)
                    self._settle_checkpoints()
                finally:
                    del self.run_meta["cooldown"]
        self.event("cooldown_finished", milestone=milestone, outcome=outcome, val_loss=self.last_val,
                   seconds=round(time.perf_counter() - started, 3))
        if outcome == "stopped":
            self.step, self.tokens_seen = fork_step, fork_tokens  # what latest.json says: where the trunk is saved
            return outcome
        # Back to the trunk as it was at the fork: weights, optimizer, counters, data position, RNG, callbacks.
        meta, rank_state = self.checkpointer.load(trunk.path, self.model, self.optimizer)
        refresh_compute_copies(self.model)
        self.restore(meta, rank_state)
        self.last_val = dict(meta.get("val_loss") or {})
        self._sound_weight_norm = self.weight_norm()
        return outcome

    def _handle_signal(self, signum, frame) -> None:
        self._stop_signal = signum

    def fit(self, stop_at_step: int | None = None) -> str:
        """Train to `max_steps` (or pause after `stop_at_step`, with the schedule still that of max_steps).
        Returns 'completed', 'paused' or 'stopped_by_signal'; a callback may stop the run by raising
        (`NonFiniteStop` after K skipped steps in a row)."""
        config = self.config
        self.checkpointer.on_saved = self._on_checkpoint_saved
        previous_handlers = {sig: signal.signal(sig, self._handle_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        self.model.train()
        status = "completed"
        just_saved = False
        try:
            self._sound_weight_norm = self.weight_norm()
            self._notify("on_fit_start")
            while self.step < config.max_steps:
                if (milestone := self._cooldown_due()) is not None:
                    if self._cool_down(milestone) == "stopped":
                        status, just_saved = "stopped_by_signal", True  # the trunk is saved at the fork
                        break
                self._notify("on_step_start")
                started = time.perf_counter()
                result = self.train_step()
                elapsed = time.perf_counter() - started
                just_saved = False
                metrics = {**result, "tokens_seen": self.tokens_seen, "step_time_s": elapsed,
                           **self.loader.repetition_metrics()}  # repetition/<source>: passes over its data
                self._notify("on_step_metrics", metrics)
                if self.log_due():
                    self._log_metrics({key: value for key, value in metrics.items() if isinstance(value, (int, float))})
                due, milestone = self._checkpoint_due()
                if due or self._owed_save is not None:
                    milestone = milestone or bool(self._owed_save)
                    withheld = self.unfit_to_save()
                    if withheld:
                        # A checkpoint of unsound weights is never written: `--resume auto` would pick it.
                        self._owed_save = milestone
                        self.health["checkpoints_withheld"] += 1
                        self.event("checkpoint_withheld", reason=withheld, milestone=milestone)
                    else:
                        self._owed_save = None
                        self._sound_weight_norm = self.weight_norm()
                        blocked = self.save(milestone=milestone)
                        self.event("checkpoint_blocked", seconds=round(blocked, 3), milestone=milestone,
                                   async_save=self.checkpointer.async_save)
                        just_saved = True
                self._notify("on_step_end", metrics)
                if self._stop_signal is not None:
                    status = "stopped_by_signal"
                    break
                if stop_at_step is not None and self.step >= stop_at_step:
                    status = "paused"
                    break
            if not just_saved and (config.checkpoint.save_at_end or status != "completed"):
                withheld = self.unfit_to_save()
                if withheld:
                    self.health["checkpoints_withheld"] += 1
                    self.event("checkpoint_withheld", reason=withheld, milestone=False, at_end=True)
                else:
                    self.save(milestone=False)
            self.checkpointer.wait()
            self._notify("on_fit_end", status)
            self.event("run_finished", status=status)
            return status
        except NonFiniteStop:
            self._notify("on_fit_end", "stopped_nonfinite")
            raise
        finally:
            self.checkpointer.close()
            for sig, handler in previous_handlers.items():
                signal.signal(sig, handler)
