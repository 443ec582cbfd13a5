"""AdamW with decoupled weight decay on matrices only, and the learning-rate schedules (cosine, WSD)."""

from __future__ import annotations

import math

import torch

from genesis.config import OptimizerConfig
from genesis_model.parallelize import ParallelPlan, compute_copies


def build_optimizer(model: torch.nn.Module, config: OptimizerConfig, plan: ParallelPlan | str) -> torch.optim.Optimizer:
    """Two parameter groups: 2-D weight matrices decay; norm gains and (unless configured) the embedding do
    not. Decaying a gain pulls it toward 0, which is a different thing from regularising a weight; and the
    tied embedding is also the output layer, where decay mostly shrinks rare tokens' rows.

    `plan`: how `parallelize` laid the model out; a plan with master weights gets `MasterWeightAdamW`, the same
    update. A device type ('cpu', 'cuda') instead stands for a plain fp32 model no plan laid out (a Hugging
    Face model, say)."""
    plan = ParallelPlan(device_type=plan) if isinstance(plan, str) else plan
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # Embedding names in Genesis's convention and in Hugging Face's (for exported models).
        is_embedding = any(key in name for key in ("tok_embeddings", "embed_tokens", "lm_head")) or name == "output.weight"
        exempt = param.ndim < 2 or is_embedding
        (no_decay if exempt and not config.decay_norms_and_embeddings else decay).append(param)
    fused = config.fused if config.fused is not None else plan.device_type == "cuda"
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if plan.master_weights:
        return MasterWeightAdamW(groups, compute_copies(model), lr=config.lr, betas=config.betas, eps=config.eps,
                                 compiled=plan.device_type == "cuda")
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps, fused=fused,
                             foreach=None if fused else True)


def _adamw_update(weights, grads, copies, exp_avgs, exp_avg_sqs, scalars: torch.Tensor, beta1: float, beta2: float,
                  eps: float, weight_decay: float) -> None:
    """torch.optim.AdamW's update, plus the rewrite of each weight's compute copy. `scalars` holds (lr, bias
    correction 1, sqrt of bias correction 2) as a tensor, so a new learning rate is new data, not a new graph.
    Compiled on CUDA: per weight, one kernel reads the gradient (bf16 or fp32), the fp32 weight and both
    moments, and writes the weight, the moments and the bf16 copy."""
    lr, bias_correction1, bias_correction2_sqrt = scalars[0], scalars[1], scalars[2]
    for weight, grad, copy, exp_avg, exp_avg_sq in zip(weights, grads, copies, exp_avgs, exp_avg_sqs):
        grad = grad.to(weight.dtype)
        weight.mul_(1 - lr * weight_decay)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        weight.sub_(exp_avg / denom * (lr / bias_correction1))
        copy.copy_(weight)


_compiled_update = None


class MasterWeightAdamW(torch.optim.Optimizer):
    """AdamW on fp32 master weights whose bf16 compute copies the model runs with (`parallel.master_weights`).

    The parameters are the model's fp32 weights, so the state (`step`, `exp_avg`, `exp_avg_sq` per weight) and
    checkpoints are those of torch.optim.AdamW: either optimizer resumes the other's checkpoint. Gradients
    arrive on the bf16 copies. With gradient accumulation, `fold_gradients()` after each micro-step moves them
    into fp32 `.grad`s on the weights, so the sum is taken in fp32; with one micro-step the update reads the bf16
    gradient directly, and nothing casts it.
    """

    def __init__(self, params, copies: dict[torch.nn.Parameter, torch.Tensor], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 compiled: bool = False):
        # NOTE: AdamW's own hyperparameter keys (amsgrad, maximize, foreach, fused, ...), so that each optimizer
        # finds every key it expects in the other's checkpoint; `fused` as build_optimizer would choose it.
        defaults = torch.optim.AdamW([torch.zeros(1)], lr=lr, betas=betas, eps=eps, weight_decay=weight_decay).defaults
        super().__init__(params, {**defaults, "fused": True if compiled else None})
        without_copy = sum(weight not in copies for group in self.param_groups for weight in group["params"])
        if without_copy:
            raise ValueError(f"{without_copy} parameters have no compute copy; use torch.optim.AdamW for them")
        self.copies = copies
        self.compiled = compiled
        self._copies_checked = False

    def gradient(self, weight: torch.nn.Parameter) -> torch.Tensor | None:
        """The weight's gradient this step: its own fp32 `.grad` (folded or from outside), else its copy's."""
        return weight.grad if weight.grad is not None else self.copies[weight].grad

    @torch.no_grad()
    def fold_gradients(self) -> None:
        """Add the copies' bf16 gradients into fp32 gradients on the weights and clear them (one micro-step)."""
        for weight, copy in self.copies.items():
            if copy.grad is None:
                continue
            if weight.grad is None:
                weight.grad = copy.grad.to(weight.dtype)
            else:
                weight.grad.add_(copy.grad)
            copy.grad = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for copy in self.copies.values():
            if set_to_none:
                copy.grad = None
            elif copy.grad is not None:
                copy.grad.zero_()

    @torch.no_grad()
    def _check_copies(self) -> None:
        # NOTE: a copy left stale by a weight change outside the optimizer (a load without
        # `refresh_compute_copies`) would train on wrong weights silently; checked once, at the first update and
        # after a state load. NaN compares equal: DCP initialises the state of a model whose memory is not yet
        # loaded (`to_empty`) with a step at lr 0 before loading.
        for weight, copy in self.copies.items():
            if not torch.allclose(copy, weight.to(copy.dtype), rtol=0, atol=0, equal_nan=True):
                raise RuntimeError("a compute copy differs from its fp32 weight: call "
                                   "parallelize.refresh_compute_copies(model) after changing the weights")
        self._copies_checked = True

    @torch.no_grad()
    def step(self, closure=None):
        global _compiled_update
        loss = closure() if closure is not None else None
        if not self._copies_checked:
            self._check_copies()
        update = _adamw_update
        if self.compiled:
            if _compiled_update is None:
                _compiled_update = torch.compile(_adamw_update, fullgraph=True)
            update = _compiled_update
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            # Weights that share a step count are updated together (normally all of a group).
            by_step: dict[float, list] = {}
            for weight in group["params"]:
                grad = self.gradient(weight)
                if grad is None:
                    continue
                state = self.state[weight]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(weight, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(weight, memory_format=torch.preserve_format)
                state["step"] += 1
                by_step.setdefault(float(state["step"]), []).append(
                    (weight, grad, self.copies[weight], state["exp_avg"], state["exp_avg_sq"]))
            for step, rows in by_step.items():
                weights, grads, copies, exp_avgs, exp_avg_sqs = (list(column) for column in zip(*rows))
                scalars = torch.tensor([float(group["lr"]), 1 - beta1 ** step, math.sqrt(1 - beta2 ** step)])
                if weights[0].is_cuda:
                    # NOTE: from pinned memory the copy is asynchronous; from pageable memory it would wait for
                    # the queued backward and stop the CPU from running ahead (see Trainer._next_micro_batch).
                    scalars = scalars.pin_memory()
                scalars = scalars.to(weights[0].device, non_blocking=True)
                update(weights, grads, copies, exp_avgs, exp_avg_sqs, scalars, beta1, beta2, group["eps"],
                       group["weight_decay"])
        return loss

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        self._copies_checked = False  # the weights were probably loaded too: check the copies again


# --------------------------------------------------------------------------------------------------------------
# The learning-rate schedule
#
# NOTE: a trunk grows in cycles: pretrain to a milestone, branch from it, continue to the next. Cosine bends its
# whole length toward max_steps, so raising max_steps mid-run lifted the LR at once (step 20,000 of 20k → 40k:
# 3.0e-5 → 1.68e-4), with no warm-up. `wsd` (warmup–stable–decay; Hägele et al. 2024, "Scaling Laws and
# Compute-Optimal Training Beyond Fixed Training Durations"; MiniCPM) holds the peak LR and cools down only over
# the last `decay_fraction` of each cycle, a cycle ending at every milestone and at max_steps: every milestone is
# a fully decayed base model, and the steps before a milestone never depend on a later max_steps, so a trunk
# extended from one continues exactly. Two ways to cool down (`cooldown`):
#   fork (default): the paper's setup. The trunk holds lr for good (its LR here: warm-up, then lr); each
#     milestone M is cooled off it (`Trainer._cool_down`): at step M − D (D = decay_fraction·milestone_every) the
#     trainer saves the trunk, trains a copy D steps on the same data with the LR falling to min_lr
#     (`cooldown_lr`), saves that as milestone M, and goes on from the saved trunk. The D steps are paid twice;
#     in return the trunk never re-warms, so growing it costs nothing.
#   inline: the trunk itself cools into each milestone (and into max_steps), and the next cycle re-warms from
#     min_lr to lr over `rewarm_steps` (an `lr_rewarm` event). No step is paid twice; every re-warm costs loss.
# A cosine run (or an inline WSD run ending off a milestone) is extended only explicitly: `extended_from` ends the
# old cycle where it was planned to end, and the next one re-warms (`check_schedule_continues`).


def forks_cooldowns(config: OptimizerConfig) -> bool:
    """Whether milestones are cooled down off a trunk that never decays (wsd with cooldown=fork)."""
    return config.schedule == "wsd" and config.cooldown == "fork"


def cooldown_steps(config: OptimizerConfig, milestone_every: int) -> int:
    """D: the updates of a forked cool-down, which starts at milestone − D."""
    return max(1, min(milestone_every, round(config.decay_fraction * milestone_every)))


def cooldown_lr(index: int, steps: int, from_lr: float, config: OptimizerConfig) -> float:
    """The LR of update `index` (0 for the first) of a forked cool-down of `steps` updates, from the trunk's
    `from_lr` down to min_lr at its last update (`decay_shape`, as inline wsd's)."""
    progress = (index + 1) / steps
    remaining = 1 - math.sqrt(progress) if config.decay_shape == "1-sqrt" else 1 - progress
    return config.min_lr + (from_lr - config.min_lr) * remaining


def cycle_bounds(step: int, config: OptimizerConfig, max_steps: int, milestone_every: int = 0) -> tuple[int, int]:
    """(start, end) of the schedule cycle holding `step` (0 ≤ step < max_steps). Cycles end at every
    `extended_from` step, at every milestone under inline `wsd`, and at max_steps; a trunk whose cool-downs are
    forked is one cycle."""
    start, end = 0, max_steps
    if forks_cooldowns(config):
        return start, end
    for boundary in config.extended_from:
        if boundary <= step:
            start = max(start, boundary)
        elif boundary < end:
            end = boundary
    if config.schedule == "wsd" and milestone_every:
        start = max(start, step // milestone_every * milestone_every)
        end = min(end, (step // milestone_every + 1) * milestone_every)
    return start, end


def _warmup_of(start: int, config: OptimizerConfig) -> int:
    return config.warmup_steps if start == 0 else (config.rewarm_steps or config.warmup_steps)


def _wsd_phases(start: int, end: int, config: OptimizerConfig) -> tuple[int, int]:
    """(warm-up, cool-down) steps of a wsd cycle: a short cycle keeps its warm-up and at least one cool-down
    step (its last update is at min_lr); the stable phase is what is left."""
    length = end - start
    warmup = min(_warmup_of(start, config), length - 1)
    decay = max(1, min(round(config.decay_fraction * length), length - warmup))
    return warmup, decay


def lr_at(step: int, config: OptimizerConfig, max_steps: int, milestone_every: int = 0) -> float:
    """The learning rate of update `step` (the number of updates already done: 0 for the first).

    Per cycle (`cycle_bounds`): a linear warm-up, from 0 over `warmup_steps` in the first cycle and from min_lr
    over `rewarm_steps` in later ones, then
      cosine: cosine decay to min_lr at the cycle's end (one cycle, to max_steps, unless `extended_from`);
      wsd:    the peak lr, then a cool-down to min_lr over the cycle's last `decay_fraction` (1-sqrt or linear),
              reaching min_lr at the cycle's last update, so the checkpoint at its end is fully decayed.
    A trunk whose cool-downs are forked: the warm-up, then lr (its milestones' cool-downs: `cooldown_lr`).
    At or past max_steps: min_lr. A pure function of the step and the config: a resumed run needs no scheduler
    state (`milestone_every`: checkpoint.milestone_every, the ends of inline wsd's cycles).
    """
    if step >= max_steps:
        return config.min_lr
    if forks_cooldowns(config):
        return config.lr * min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps else config.lr
    start, end = cycle_bounds(step, config, max_steps, milestone_every)
    index, length = step - start, end - start
    floor = 0.0 if start == 0 else config.min_lr
    if config.schedule == "wsd":
        warmup, decay = _wsd_phases(start, end, config)
        if index < warmup:
            return floor + (config.lr - floor) * (index + 1) / warmup
        into_decay = index - (length - decay) + 1
        if into_decay <= 0:
            return config.lr
        progress = into_decay / decay
        remaining = 1 - math.sqrt(progress) if config.decay_shape == "1-sqrt" else 1 - progress
        return config.min_lr + (config.lr - config.min_lr) * remaining
    warmup = _warmup_of(start, config)
    if warmup and index < warmup:
        return floor + (config.lr - floor) * (index + 1) / warmup
    decay_steps = max(1, length - warmup)
    progress = min(1.0, (index - warmup) / decay_steps)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * progress))


def rewarm_at(step: int, config: OptimizerConfig, max_steps: int, milestone_every: int = 0) -> dict | None:
    """The re-warm-up that starts at `step` (a later cycle's first update), for the trainer's `lr_rewarm` event;
    None at any other step."""
    if step == 0 or step >= max_steps:
        return None
    start, end = cycle_bounds(step, config, max_steps, milestone_every)
    if start != step:
        return None
    steps = _wsd_phases(start, end, config)[0] if config.schedule == "wsd" else _warmup_of(start, config)
    return {"schedule": config.schedule, "from_lr": config.min_lr, "to_lr": config.lr, "steps": steps,
            "cycle_end": end}


def check_schedule_continues(saved: dict | None, new: dict, step: int) -> str | None:
    """Why resuming at `step` a checkpoint trained under config `saved` (its meta's "config") with config `new`
    would make the LR jump, or None. A jump: the schedule of the steps already done changed (the run was
    already bending toward another end) and the next update's LR is above the one the checkpoint's schedule
    had for it. Peak and floor (`lr`, `min_lr`) are taken from `new` for both: changing them is a separate,
    visible choice; what is compared is the schedule's shape (kind, warm-up, cycles, max_steps)."""
    if not saved or step <= 0 or step >= int(new["max_steps"]):
        return None  # nothing done, or nothing left to train
    try:
        new_opt = OptimizerConfig.model_validate(new["optimizer"])
        trained = dict(saved.get("optimizer", {}))
        if trained.get("schedule") == "wsd":
            # A wsd trunk saved before `cooldown` existed cooled into its milestones itself: read it as inline,
            # or a resume past a milestone would jump from min_lr to the peak under today's default (fork).
            trained.setdefault("cooldown", "inline")
        old_opt = OptimizerConfig.model_validate({**trained, "lr": new_opt.lr, "min_lr": new_opt.min_lr})
        old_max, new_max = int(saved["max_steps"]), int(new["max_steps"])
    except (KeyError, TypeError, ValueError):
        return None  # a config this version cannot read: nothing to compare
    old_every = int(saved.get("checkpoint", {}).get("milestone_every", 0))
    new_every = int(new.get("checkpoint", {}).get("milestone_every", 0))

    def first_difference(opt: OptimizerConfig) -> int | None:
        for done in range(step):
            if not math.isclose(lr_at(done, old_opt, old_max, old_every), lr_at(done, opt, new_max, new_every),
                                rel_tol=1e-9, abs_tol=0.0):
                return done
        return None

    differs = first_difference(new_opt)
    if differs is None:
        return None
    before, after = lr_at(step, old_opt, old_max, old_every), lr_at(step, new_opt, new_max, new_every)
    if after <= before * (1 + 1e-9):
        return None
    what = (f"max_steps {old_max} → {new_max}" if new_max != old_max else "the schedule's settings")
    fix = "restore the checkpoint's optimizer schedule settings"
    if old_opt.schedule == new_opt.schedule == "wsd" and old_opt.cooldown != new_opt.cooldown:
        fix = f"pass optimizer.cooldown={old_opt.cooldown}, as this trunk was trained"
    if new_max > old_max:
        suggested = sorted({*new_opt.extended_from, old_max})
        if first_difference(new_opt.model_copy(update={"extended_from": suggested})) is None:
            fix = (f"pass optimizer.extended_from={suggested} to end the trained cycle at step {old_max} and re-warm "
                   f"from there (logged), or keep max_steps {old_max}")
    return (f"resuming at step {step} with {what} changes the learning-rate schedule of the steps already done "
            f"(from step {differs}) and would raise the LR of step {step} from {before:.3g} to {after:.3g} with no "
            f"warm-up; {fix} (a trunk meant to grow: optimizer.schedule=wsd from its start)")
