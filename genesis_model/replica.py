"""Micro-steps on a plain replica of the whole model, beside FSDP's shards (`parallel.micro_steps: replica`).

Why: at micro-batch 1 (what a 24 GB card holds for genesis-1b) a micro-step is about 30 ms of GPU work, and under
FSDP every block runs Python hooks around it on every micro-step, even when the weights stay gathered and the
gradients unreduced through the accumulation (`accumulate_unsharded`). On 2 H200s the step was bound by the host's
CPU: 1.47–1.77× one GPU, where one plain rank, one compiled graph per micro-step, ran 0.30 s a step with the GPU 89%
busy (BENCHMARKS "Two GPUs").

What: each rank keeps the full model as a plain module whose weights are in the compute dtype (bf16 on a GPU),
as FSDP's gathered weights are. Once per optimizer step they are gathered from FSDP's fp32 shards, cast to that
dtype first as FSDP casts before its all-gather (one all-gather per parameter); the micro-steps then run on it with no collective and no FSDP hook. After each micro-step its
gradients are summed into fp32 ones (`fold_gradients`), as FSDP sums unreduced gradients in its fp32 reduce
dtype; after the last, each sum is reduce-scattered in `parallel.reduce_dtype` (averaged over the ranks, as FSDP
does) into the shard's `.grad`. From there on nothing changes: clipping, the optimizer and checkpoints see FSDP's sharded parameters, so
a checkpoint does not know which mode wrote it. Evaluation runs FSDP's own forward, uncompiled.

Memory per rank beside FSDP's shards: the replica's bf16 weights and the fp32 sums, 6 bytes a parameter (6 GB for
genesis-1b), as FSDP holds with its weights kept gathered (`accumulate_unsharded`), plus one micro-step's bf16
gradients until they are folded.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Shard

from genesis.config import ModelConfig
from genesis_model.model import Transformer
from genesis_model.parallelize import (DTYPES, ParallelPlan, apply_activation_checkpointing, apply_compile,
                                       apply_float8)

_WRAPPER_PREFIX = "_checkpoint_wrapped_module."  # activation checkpointing's module, in parameter names


def build_replica(config: ModelConfig, device: torch.device, plan: ParallelPlan) -> Transformer:
    """The plain module the micro-steps run on, laid out as one plain rank's: FP8 layers, activation
    checkpointing and compile as `plan` says, its weights in `plan.param_dtype` (the rope tables stay fp32 buffers,
    cast in the blocks, as under FSDP). The weights are allocated, not initialised: `Replica.pull_weights` writes
    them all before the first forward."""
    with torch.device("meta"):
        replica = Transformer(config)
    replica = replica.to_empty(device=device)
    replica.reset_rope_tables()
    for param in replica.parameters():
        param.data = param.data.to(DTYPES[plan.param_dtype])
    if plan.float8 != "off":
        apply_float8(replica, plan.float8, fsdp=False)
    apply_activation_checkpointing(replica, plan.activation_checkpointing)
    if plan.compile:
        apply_compile(replica, plan.compile_memory_budget, plan.compile_scope, float8=plan.float8 != "off")
    return replica


class Replica:
    """The replica and, for each of its parameters, the FSDP parameter it mirrors (paired by name)."""

    def __init__(self, sharded: nn.Module, replica: Transformer, reduce_dtype: torch.dtype = torch.float32):
        mirrored = {name.replace(_WRAPPER_PREFIX, ""): param for name, param in sharded.named_parameters()}
        own = {name.replace(_WRAPPER_PREFIX, ""): param for name, param in replica.named_parameters()}
        if mirrored.keys() != own.keys():
            raise ValueError(f"the replica's parameters are not the model's: {sorted(mirrored.keys() ^ own.keys())}")
        for name, param in mirrored.items():
            if not isinstance(param, DTensor) or param.placements != (Shard(0),):
                raise ValueError(f"{name}: a replica mirrors FSDP's dim-0 shards, this is {type(param).__name__}")
        self.module, self.reduce_dtype = replica, reduce_dtype
        self.pairs = [(mirrored[name], own[name]) for name in own]
        self._sums: list[torch.Tensor] | None = None  # this optimizer step's gradients so far, fp32

    @torch.no_grad()
    def pull_weights(self) -> None:
        """The replica's weights := FSDP's, gathered from every rank's shard (before an optimizer step's
        micro-steps; the optimizer has changed the shards since the last)."""
        for shard, weight in self.pairs:
            weight.copy_(shard.to(weight.dtype).full_tensor())

    @torch.no_grad()
    def fold_gradients(self) -> None:
        """After each micro-step: add the replica's gradients into this step's fp32 sums and drop them. A
        parameter without a gradient (unused this micro-step) adds zeros, so every rank sums, and later reduces,
        the same tensors."""
        grads = []
        for _, weight in self.pairs:
            grads.append(weight.grad if weight.grad is not None else torch.zeros_like(weight))
            weight.grad = None
        if self._sums is None:
            self._sums = [grad.float() for grad in grads]  # fp32 already (the CPU): the gradient itself, no copy
        else:
            torch._foreach_add_(self._sums, grads)

    @torch.no_grad()
    def push_gradients(self) -> None:
        """Each FSDP parameter's `.grad` := its shard of the summed gradient averaged over the ranks (one
        reduce-scatter per parameter), then the sums are dropped."""
        if self._sums is None:
            raise RuntimeError("no gradients to push: fold_gradients() after each micro-step's backward")
        world_size = dist.get_world_size()
        sums, self._sums = self._sums, None
        for index, (shard, _) in enumerate(self.pairs):
            total, sums[index] = sums[index].to(self.reduce_dtype), None  # each sum freed once reduced
            # NOTE: summed, then divided: gloo (CPU runs) has no average reduction. Dividing by a power of two is
            # exact, so 2 ranks average as FSDP does to the bit.
            summed = DTensor.from_local(total, shard.device_mesh, [Partial("sum")], run_check=False)
            shard.grad = summed.redistribute(shard.device_mesh, [Shard(0)]).to(shard.dtype) / world_size
