"""AdamW with decoupled weight decay on matrices only, and the warmup + cosine learning-rate schedule."""

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


def lr_at(step: int, config: OptimizerConfig, max_steps: int) -> float:
    """Linear warmup to `lr` over `warmup_steps`, then cosine decay to `min_lr` at `max_steps`.

    `step` is the number of updates already done (0 for the first). A pure function of the step, so a
    resumed run needs no scheduler state, and raising max_steps for a continued cycle stretches the tail.
    """
    if config.warmup_steps and step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    decay_steps = max(1, max_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / decay_steps)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * progress))
