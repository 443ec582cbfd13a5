"""AdamW with decoupled weight decay on matrices only, and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch

from genesis.config import OptimizerConfig


def build_optimizer(model: torch.nn.Module, config: OptimizerConfig, device_type: str) -> torch.optim.AdamW:
    """Two parameter groups: 2-D weight matrices decay; norm gains and (unless configured) the embedding do
    not. Decaying a gain pulls it toward 0, which is a different thing from regularising a weight; and the
    tied embedding is also the output layer, where decay mostly shrinks rare tokens' rows."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # Embedding names in Genesis's convention and in Hugging Face's (for exported models).
        is_embedding = any(key in name for key in ("tok_embeddings", "embed_tokens", "lm_head")) or name == "output.weight"
        exempt = param.ndim < 2 or is_embedding
        (no_decay if exempt and not config.decay_norms_and_embeddings else decay).append(param)
    fused = config.fused if config.fused is not None else device_type == "cuda"
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps, fused=fused,
                             foreach=None if fused else True)


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
