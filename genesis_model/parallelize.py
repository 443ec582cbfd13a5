"""Turn a single-device `Transformer` into a trainable one: activation checkpointing, compile, then FSDP2.

Order matters and follows torchtitan: checkpointing wraps a block's computation, compile traces the
(possibly checkpointed) block, and FSDP2 shards last so its hooks sit outside the compiled region.

On one rank there is nothing to shard. By default (`one_rank="plain"`) the model then stays a plain module
with fp32 weights that compute in bf16 (`Transformer.compute_dtype`): the same maths as FSDP's bf16
parameter policy, without its per-step copies and Python hooks, and it may be compiled as one graph.
With `master_weights`, each fp32 weight also gets a bf16 compute copy that the forward uses and the
optimizer (`optim.MasterWeightAdamW`) rewrites in the same pass as its update: no weight cast in the forward,
no gradient cast in the backward. Gradients are then bf16, as under FSDP's bf16 policy.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from genesis_model.model import Transformer

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}

# Ops whose outputs selective checkpointing keeps: the matmuls and attention are expensive to recompute;
# norms, RoPE and SiLU are cheap elementwise work that costs memory to keep.
_SAVED_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
}


def apply_activation_checkpointing(model: Transformer, mode: Literal["none", "selective", "full"]) -> None:
    """`full` recomputes each whole block in backward (least memory); `selective` keeps matmul and attention
    outputs and recomputes only elementwise ops (most of the memory saving at a few percent of compute)."""
    if mode == "none":
        return
    from functools import partial

    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE

    for name, block in list(model.layers.items()):
        if mode == "full":
            wrapped = checkpoint_wrapper(block, preserve_rng_state=False)
        else:
            wrapped = checkpoint_wrapper(
                block,
                preserve_rng_state=False,
                context_fn=partial(create_selective_checkpoint_contexts, policy),
            )
        model.layers[name] = wrapped


def apply_compile(model: Transformer, memory_budget: float = 1.0, scope: Literal["blocks", "model"] = "blocks") -> None:
    """`blocks`: compile each block separately. The blocks share code, so Dynamo compiles one graph and
    reuses it for all of them: minutes for a whole-model compile of genesis-1b become well under a minute.
    `Module.compile()` compiles in place, so parameter names (and checkpoints) are unchanged.
    `model`: one graph from the embedding to the final norm (`Transformer.hidden_states`); a longer first
    compile, but one compiled call per step instead of one per block, which is what a launch-bound step at
    micro-batch 1 needs. FSDP's hooks cannot live inside that graph, so it is for one rank only.

    `memory_budget` < 1 switches AOTAutograd's partitioner to its memory-budget mode: it picks what to
    recompute in backward by estimated runtime per byte saved, so elementwise outputs (RMSNorm outputs, the
    SiLU·up product feeding the down projection) go first. Which ops it chose is measured, not assumed:
    BENCHMARKS.md lists the saved tensors per block and the step time at each budget.
    """
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    # NOTE: a process-wide setting, read when each graph is compiled (the first forward), not here; the
    # engine compiles only the blocks, and the loss kernel has no backward graph to partition.
    functorch_config.activation_memory_budget = memory_budget
    # NOTE: Inductor computes fused elementwise ops in fp32 and by default drops the bf16 roundings between
    # them. On the plain one-rank path the RMSNorm gain is an fp32 weight cast to bf16 in the graph, so that
    # dropped rounding made one GPU compute differently from FSDP (whose gain arrives already in bf16): a
    # 2-GPU checkpoint resumed on one H200 started 0.36% off in loss (BENCHMARKS.md). Keeping eager's
    # roundings makes compiled, eager, plain and FSDP agree to the bit in the forward.
    inductor_config.emulate_precision_casts = True
    if scope == "model":
        # NOTE: an instance attribute shadows the method, so `forward` calls the compiled graph while the
        # module tree, parameter names and checkpoints stay those of the plain model.
        model.hidden_states = torch.compile(model.hidden_states, fullgraph=True)
        return
    for block in model.layers.values():
        block.compile(fullgraph=True)


def attach_compute_copies(model: nn.Module, dtype: torch.dtype) -> None:
    """Give every layer with a `compute_weight` slot a copy of its weight in `dtype` that receives gradients."""
    for module in model.modules():
        if hasattr(module, "compute_weight") and isinstance(getattr(module, "weight", None), nn.Parameter):
            module.compute_weight = module.weight.detach().to(dtype).requires_grad_(True)


def compute_copies(model: nn.Module) -> dict[nn.Parameter, torch.Tensor]:
    """fp32 weight → its compute copy, for the layers that have one."""
    return {module.weight: module.compute_weight for module in model.modules()
            if getattr(module, "compute_weight", None) is not None}


@torch.no_grad()
def refresh_compute_copies(model: nn.Module) -> None:
    """Rewrite the copies from the weights: after anything but the optimizer changed the weights (a checkpoint
    load, an initialisation)."""
    for weight, copy in compute_copies(model).items():
        copy.copy_(weight)


def apply_fsdp(
    model: Transformer,
    mesh: DeviceMesh,
    param_dtype: torch.dtype = torch.bfloat16,
    reduce_dtype: torch.dtype = torch.float32,
    reshard_after_forward: bool = True,
    unit_blocks: int = 1,
) -> None:
    """FSDP2: shard every block (or every `unit_blocks` consecutive blocks as one unit), then the root
    (embedding, final norm, output); one rank: the root only.

    Parameters stay fp32 in their shards (the optimizer's master weights); each forward all-gathers them
    as `param_dtype`, and gradients are reduced in `reduce_dtype`.
    With `one_rank="fsdp"` it also runs on one rank, where it only applies the bf16 parameter policy (the
    multi-GPU code path on one GPU; the plain path computes the same maths with fewer copies).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    # NOTE: a block's inputs need no cast: its activations already arrive in param_dtype, and the rope tables
    # (fp32 buffers) are cast to the activations' dtype inside the compiled block, as on one plain rank. FSDP's
    # default casts them anyway, two copies per block per micro-step, plus a walk over the arguments on the CPU:
    # 0.18 ms of CPU per block call on a slow host (profiled on 2 H200s, BENCHMARKS.md), where micro-batch 1
    # is bound by the CPU.
    block_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False)
    # NOTE: per-block units exist to free each block's gathered parameters after its forward. With one rank
    # nothing is sharded and nothing is freed, yet every unit costs four Python hooks per step, which made
    # micro-batch 1 CPU-bound on an H100 (profiled: 49 ms of GPU work in a 92 ms step). One root unit then
    # does the same maths with one all-gather and one reduce-scatter per step.
    if mesh.size() > 1:
        blocks = list(model.layers.values())
        units = [blocks[start:start + unit_blocks] for start in range(0, len(blocks), unit_blocks)]
        for index, unit in enumerate(units):
            # The last unit's parameters are needed again at once by backward; keep them gathered.
            reshard = reshard_after_forward and index < len(units) - 1
            # NOTE: a list is one FSDP unit: one all-gather, one reduce-scatter and one set of hooks for all of it.
            fully_shard(unit if len(unit) > 1 else unit[0], mesh=mesh, mp_policy=block_policy,
                        reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)


def parallelize(
    model: Transformer,
    mesh: DeviceMesh,
    param_dtype: str = "bfloat16",
    reduce_dtype: str = "float32",
    compile: bool = True,
    activation_checkpointing: Literal["none", "selective", "full"] = "none",
    compile_memory_budget: float = 1.0,
    one_rank: Literal["plain", "fsdp"] = "plain",
    compile_scope: Literal["blocks", "model"] = "blocks",
    fsdp_unit_blocks: int = 1,
    master_weights: bool = False,
) -> nn.Module:
    """`param_dtype` is the compute dtype of matmuls; weights, gradients and optimizer state stay fp32.
    `reduce_dtype` is FSDP's gradient reduction dtype (on one plain rank gradients are simply fp32).
    `master_weights` (one plain rank, bf16): bf16 compute copies of the fp32 weights, see the module docstring."""
    plain = mesh.size() == 1 and one_rank == "plain"
    if compile and compile_scope == "model" and not plain:
        raise ValueError("parallel.compile_scope 'model' needs one rank without FSDP (parallel.one_rank: plain); "
                         "use compile_scope 'blocks' with several ranks")
    if master_weights and not (plain and param_dtype != "float32"):
        raise ValueError("parallel.master_weights needs one rank without FSDP (parallel.one_rank: plain) and "
                         "param_dtype bfloat16; FSDP already keeps fp32 masters apart from its bf16 weights")
    if master_weights:
        # NOTE: before compile, so the compiled graphs take the copies as their inputs from the first call.
        attach_compute_copies(model, DTYPES[param_dtype])
    apply_activation_checkpointing(model, activation_checkpointing)
    if compile:
        apply_compile(model, compile_memory_budget, compile_scope)
    if plain:
        model.compute_dtype = DTYPES[param_dtype]
    else:
        apply_fsdp(model, mesh, DTYPES[param_dtype], DTYPES[reduce_dtype], reshard_after_forward=mesh.size() > 1,
                   unit_blocks=fsdp_unit_blocks)
    return model
