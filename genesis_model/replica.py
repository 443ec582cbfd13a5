"""Micro-steps on a plain replica of the whole model, beside FSDP's shards (`parallel.micro_steps: replica`).

Why: at micro-batch 1 (what a 24 GB card holds for genesis-1b) a micro-step is about 30 ms of GPU work, and under
FSDP every block runs Python hooks around it on every micro-step, even when the weights stay gathered and the
gradients unreduced through the accumulation (`accumulate_unsharded`). On 2 H200s the step was bound by the host's
CPU: 1.47–1.77× one GPU, where one plain rank, one compiled graph per micro-step, ran 0.30 s a step with the GPU 89%
busy (BENCHMARKS "Two GPUs").

What: each rank keeps the full model as a plain module whose weights are in the compute dtype (bf16 on a GPU),
as FSDP's gathered weights are. Once per optimizer step they are gathered from FSDP's fp32 shards, cast to that
dtype first as FSDP casts before its all-gather (one all-gather for all of them). The micro-steps then run on it
with no collective and no FSDP hook. After each micro-step its gradients are summed into fp32 ones
(`fold_gradients`), as FSDP sums unreduced gradients in its fp32 reduce dtype. After the last, the sums are
reduce-scattered in `parallel.reduce_dtype` (one reduce-scatter for all of them, averaged over the ranks as FSDP
does) into the shards' `.grad`. From there on nothing changes: clipping, the optimizer and checkpoints see FSDP's
sharded parameters, so a checkpoint does not know which mode wrote it. Evaluation runs FSDP's own forward,
uncompiled.

Memory per rank beside FSDP's shards: the replica's bf16 weights and the fp32 sums, 6 bytes a parameter (6 GB for
genesis-1b), as FSDP holds with its weights kept gathered (`accumulate_unsharded`), plus one micro-step's bf16
gradients until they are folded.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from genesis.config import ModelConfig
from genesis_model.model import Transformer
from genesis_model.parallelize import (DTYPES, ParallelPlan, apply_activation_checkpointing, apply_compile,
                                       apply_float8)

_WRAPPER_PREFIX = "_checkpoint_wrapped_module."  # activation checkpointing's module, in parameter names
# NOTE: torch 2.13 renamed the flat collectives (`*_single`) and deprecates the old names; the GPU machines run 2.11,
# which has only the old ones. Same signatures.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


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
    """The replica and, for each of its parameters, the FSDP parameter it mirrors (paired by name).

    Both collectives go through one flat buffer each, laid out as FSDP lays out a shard: rank r's part of a
    parameter is its rows [r·c, (r+1)·c), c = ⌈rows / ranks⌉, padded to c rows. So the all-gather and the
    reduce-scatter are one call each per optimizer step, and the copies in and out are a few foreach calls.
    NOTE: not through DTensor's `full_tensor`/`redistribute`: those are a collective and some Python per
    parameter (122 of them for genesis-1b), the host time per step this mode exists to save."""

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
        mesh = self.pairs[0][0].device_mesh
        self.group, self.world_size = mesh.get_group(), mesh.size()
        # Each parameter's slot in a rank's part of the flat buffers: (offset, rows per rank c, c · row size).
        self.slots, offset = [], 0
        for _, weight in self.pairs:
            rows_per_rank = -(-weight.shape[0] // self.world_size)
            size = rows_per_rank * math.prod(weight.shape[1:])
            self.slots.append((offset, rows_per_rank, size))
            offset += size
        self.part_numel = offset
        self._sums: torch.Tensor | None = None  # this optimizer step's gradients so far, fp32, all ranks' parts
        self._sum_views: list[torch.Tensor] = []

    def _by_rank(self, buffer: torch.Tensor, index: int) -> torch.Tensor:
        """Parameter `index`'s slot in every rank's part of `buffer` (ranks × part_numel), as (ranks, c, ...)."""
        offset, rows_per_rank, size = self.slots[index]
        weight = self.pairs[index][1]
        return buffer.view(self.world_size, self.part_numel)[:, offset:offset + size].view(
            self.world_size, rows_per_rank, *weight.shape[1:])

    def _pair_up(self, by_rank: torch.Tensor, full: torch.Tensor,
                 index: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(slot rows, rows of the full tensor) pairs covering `full`: one when the rows divide evenly over the
        ranks, else one per rank (the last ranks' slots are padded, or empty)."""
        rows_per_rank = self.slots[index][1]
        if rows_per_rank * self.world_size == full.shape[0]:
            return [(by_rank, full.view(by_rank.shape))]
        return [(by_rank[rank, :piece.shape[0]], piece) for rank, piece in enumerate(full.split(rows_per_rank))]

    @torch.no_grad()
    def pull_weights(self) -> None:
        """The replica's weights := FSDP's, gathered from every rank's shard, cast first to the replica's dtype as
        FSDP casts before its all-gather (before an optimizer step's micro-steps: the optimizer has changed the
        shards since the last)."""
        dtype, device = self.pairs[0][1].dtype, self.pairs[0][1].device
        part = torch.empty(self.part_numel, dtype=dtype, device=device)
        into, shards = [], []
        for (shard, _), (offset, _, _) in zip(self.pairs, self.slots, strict=True):
            local = shard.to_local()
            if local.numel():
                into.append(part[offset:offset + local.numel()].view(local.shape))
                shards.append(local)
        torch._foreach_copy_(into, shards)
        gathered = torch.empty(self.world_size * self.part_numel, dtype=dtype, device=device)
        _all_gather(gathered, part, group=self.group)
        weights, slots = [], []
        for index, (_, weight) in enumerate(self.pairs):
            for slot, rows in self._pair_up(self._by_rank(gathered, index), weight, index):
                weights.append(rows)
                slots.append(slot)
        torch._foreach_copy_(weights, slots)

    @torch.no_grad()
    def fold_gradients(self) -> None:
        """After each micro-step: add the replica's gradients into this step's fp32 sums and drop them. A
        parameter without a gradient (unused this micro-step) adds nothing; every rank then reduces the same
        buffer."""
        if self._sums is None:
            self._sums = torch.zeros(self.world_size * self.part_numel, dtype=torch.float32,
                                     device=self.pairs[0][1].device)
            self._sum_views = [self._by_rank(self._sums, index) for index in range(len(self.pairs))]
        sums, grads = [], []
        for index, (_, weight) in enumerate(self.pairs):
            if weight.grad is not None:
                for slot, rows in self._pair_up(self._sum_views[index], weight.grad, index):
                    sums.append(slot)
                    grads.append(rows)
                weight.grad = None
        torch._foreach_add_(sums, grads)

    @torch.no_grad()
    def push_gradients(self) -> None:
        """Each FSDP parameter's `.grad` := its shard of the summed gradients averaged over the ranks: one
        reduce-scatter of the sums (in `reduce_dtype`), then the sums are dropped. The shards' gradients are
        views of one buffer, as FSDP's are."""
        if self._sums is None:
            raise RuntimeError("no gradients to push: fold_gradients() after each micro-step's backward")
        sums, self._sums, self._sum_views = self._sums.to(self.reduce_dtype), None, []
        reduced = torch.empty(self.part_numel, dtype=sums.dtype, device=sums.device)
        _reduce_scatter(reduced, sums, op=dist.ReduceOp.SUM, group=self.group)
        del sums
        # NOTE: summed, then divided: gloo (CPU runs) has no average reduction. Dividing by a power of two is
        # exact, so 2 ranks average as FSDP does to the bit.
        reduced = reduced.float().div_(self.world_size)
        for (shard, weight), (offset, rows_per_rank, size) in zip(self.pairs, self.slots, strict=True):
            local_rows = shard.to_local().shape[0]
            local = reduced[offset:offset + size].view(rows_per_rank, *weight.shape[1:])[:local_rows]
            shard.grad = DTensor.from_local(local, shard.device_mesh, shard.placements, run_check=False,
                                            shape=shard.shape, stride=shard.stride())
