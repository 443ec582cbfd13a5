"""Turn a single-device `Transformer` into a trainable one: activation checkpointing, compile, then FSDP2.

Order matters and follows torchtitan: checkpointing wraps a block's computation, compile traces the
(possibly checkpointed) block, and FSDP2 shards last so its hooks sit outside the compiled region.

On one rank there is nothing to shard. By default (`one_rank="plain"`) the model then stays a plain module
with fp32 weights that compute in bf16 (`Transformer.compute_dtype`): the same maths as FSDP's bf16
parameter policy, without its per-step copies and Python hooks, and it may be compiled as one graph.
With `master_weights`, each fp32 weight also gets a bf16 compute copy that the forward uses and the
optimizer (`optim.MasterWeightAdamW`) rewrites in the same pass as its update: no weight cast in the forward,
no gradient cast in the backward. Gradients are then bf16, as under FSDP's bf16 policy.

What is done is decided once, by `plan_parallel`, from `parallel:` in the config, the world size, the device and
the accumulation steps: a frozen `ParallelPlan`. Every check of the parallel settings lives there, so a setting
this job cannot run is refused with one line before the run directory is touched. `parallelize` applies the
plan; the optimizer (`optim.build_optimizer`) and the trainer take the same plan instead of inspecting the model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from genesis.config import ParallelConfig
from genesis.errors import ConfigError
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


def apply_compile(model: Transformer, memory_budget: float = 1.0, scope: Literal["blocks", "model"] = "blocks",
                  float8: bool = False) -> None:
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

    `float8`: the blocks hold torchao's float8 layers, whose scaling and casting kernels Inductor generates
    (see the NOTE below).
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
    if float8:
        # NOTE: measured on an H200 (genesis-1b, micro-batch 16, tensorwise; BENCHMARKS "FP8 training"): a
        # quarter of FP8's step went to the amax and cast kernels around its matmuls. Several write transposed
        # (column-major) FP8 copies for the weight-gradient matmuls. With 1-D tiles their stores do not
        # coalesce. Two process-wide settings, read when each graph compiles:
        #   - 2-D tiles (`prefer_nd_tiling`): 92.7k → 94.3k tokens/s;
        #   - tuning each generated kernel's block sizes (`coordinate_descent_tuning`): 94.7k, at about
        #     2 minutes more of first compile; both together measured 94.4k in a later call.
        # Inductor's own switch wins where it is set: TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=0 starts those
        # minutes sooner and keeps the tiles.
        inductor_config.triton.prefer_nd_tiling = True
        if "TORCHINDUCTOR_COORDINATE_DESCENT_TUNING" not in os.environ:
            inductor_config.coordinate_descent_tuning = True
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


@dataclass(frozen=True)
class ParallelPlan:
    """How one job lays out and steps the model; `plan_parallel` decides it from the config.

    Defaults describe one plain rank computing in fp32, uncompiled: tests and benchmarks build other plans
    directly with the fields they need (`ParallelPlan(param_dtype="bfloat16", fsdp=True)`), unchecked."""

    device_type: str = "cpu"
    world_size: int = 1
    # FSDP2 (fully_shard) around the blocks and the root; else the plain module, computing in `param_dtype`.
    fsdp: bool = False
    param_dtype: Literal["bfloat16", "float32"] = "float32"  # the matmuls' compute dtype; weights stay fp32
    reduce_dtype: Literal["bfloat16", "float32"] = "float32"  # FSDP's gradient reduction dtype
    # bf16 compute copies of the fp32 weights, rewritten by `optim.MasterWeightAdamW` (one plain rank, bf16).
    master_weights: bool = False
    compile: bool = False
    compile_scope: Literal["blocks", "model"] = "blocks"
    compile_memory_budget: float = 1.0
    activation_checkpointing: Literal["none", "selective", "full"] = "none"
    # FSDP: free each unit's gathered weights after its forward (gathered again in backward).
    reshard_after_forward: bool = False
    # FSDP with several ranks and accumulation: weights stay gathered and gradients unreduced from the first
    # micro-step to the last (the trainer toggles resharding and gradient sync per micro-step).
    accumulate_unsharded: bool = False
    fsdp_unit_blocks: int = 1
    grad_accum_steps: int = 1
    float8: Literal["off", "rowwise", "tensorwise"] = "off"
    # FSDP: micro-steps run on a plain replica of the whole model (`replica.py`); FSDP's shards keep the weights,
    # gradients and optimizer state, and its own forward serves evaluation only (uncompiled). `compile`,
    # `compile_scope` and `activation_checkpointing` then describe the replica.
    replica: bool = False

    @property
    def fold_gradients(self) -> bool:
        """The compute copies' bf16 gradients are summed into fp32 ones after every micro-step."""
        return self.master_weights and self.grad_accum_steps > 1

    def record(self) -> dict:
        """What 'auto' and unset settings became, for the run's meta (`parallel_resolved`)."""
        return {"compile_scope": self.compile_scope, "master_weights": self.master_weights, "compile": self.compile,
                "param_dtype": self.param_dtype, "float8": self.float8,
                "micro_steps": "replica" if self.replica else "fsdp" if self.fsdp else "plain"}


def plan_parallel(parallel: ParallelConfig, world_size: int, device_type: str,
                  grad_accum_steps: int = 1) -> ParallelPlan:
    """Decide the plan, resolving 'auto' and unset settings, and refuse what this job cannot run with one
    `ConfigError` line naming the field and the fix. The only place parallel settings are checked.

    NOTE: auto turns compile_scope 'model' and master weights on only for the configuration measured on a GPU
    (one plain rank, bf16, no activation checkpointing); set them explicitly to combine them with checkpointing.
    A replica (`micro_steps: replica`, opt-in) is compiled as that plain rank is, one graph: its reason to exist."""
    if parallel.master_weights and (parallel.one_rank != "plain" or parallel.param_dtype != "bfloat16"):
        raise ConfigError("parallel.master_weights needs one_rank 'plain' and param_dtype 'bfloat16' (FSDP keeps its "
                          "own fp32 masters; fp32 compute has nothing to copy): set parallel.master_weights=false")
    if parallel.master_weights and world_size > 1:
        raise ConfigError(f"parallel.master_weights is for one rank; with {world_size} ranks FSDP keeps the fp32 "
                          "master weights itself: set parallel.master_weights=false")
    plain = world_size == 1 and parallel.one_rank == "plain"
    # NOTE: one plain rank already runs every micro-step on a plain module; there is nothing to replicate.
    replica = not plain and parallel.micro_steps == "replica"
    check_float8(parallel, device_type)
    compile = parallel.compile and device_type == "cuda"
    measured = plain and parallel.activation_checkpointing == "none"
    # The replica is a plain module: its compile is chosen as one plain rank's would be.
    whole_graph_fits = (plain or replica) and parallel.activation_checkpointing == "none"
    # NOTE: FP8's measured step compiles each block (BENCHMARKS "FP8 training": 96.3k tokens/s for genesis-1b, its
    # first compile 137 s). As one whole-model graph, FP8 did not finish compiling in 150 s there, and on the small
    # preset its step 10 came about 8½ minutes after start, beside a bf16 run.
    scope = parallel.compile_scope if parallel.compile_scope != "auto" else (
        "model" if whole_graph_fits and parallel.float8 == "off" else "blocks")
    if compile and scope == "model" and not (plain or replica):
        raise ConfigError("parallel.compile_scope 'model' needs one rank without FSDP (parallel.one_rank: plain); "
                          "use compile_scope 'blocks' with several ranks, or parallel.micro_steps 'replica'")
    # NOTE: FP8 swaps the blocks' linear layers for torchao's, which compute from the fp32 weight itself: there
    # is no bf16 compute copy to keep, so auto leaves master weights off under FP8 (and an explicit true is refused).
    master_weights = (parallel.master_weights if parallel.master_weights is not None
                      else measured and device_type == "cuda" and parallel.param_dtype == "bfloat16"
                      and parallel.float8 == "off")
    # NOTE: CPU runs compute in fp32, except with master_weights, which only exist in bf16 (and are tested so).
    param_dtype = parallel.param_dtype if device_type == "cuda" or master_weights else "float32"
    accumulate_unsharded = (not plain and not replica and world_size > 1 and grad_accum_steps > 1
                            and parallel.accumulate_unsharded)
    return ParallelPlan(
        device_type=device_type, world_size=world_size, fsdp=not plain, param_dtype=param_dtype,
        reduce_dtype=parallel.reduce_dtype, master_weights=master_weights, compile=compile, compile_scope=scope,
        compile_memory_budget=parallel.compile_memory_budget,
        activation_checkpointing=parallel.activation_checkpointing,
        # NOTE: with resharding after forward, every micro-step all-gathers each block twice (forward and
        # backward): 2 × accumulation × 2 bytes × parameters per optimizer step, which over PCIe, or any link
        # slower than the GPU, dominates the step. Kept unsharded, the weights are gathered once per optimizer
        # step and the gradients reduced once (`Trainer.train_step`). One rank has nothing to free.
        reshard_after_forward=not plain and world_size > 1 and not accumulate_unsharded,
        accumulate_unsharded=accumulate_unsharded, fsdp_unit_blocks=parallel.fsdp_unit_blocks,
        grad_accum_steps=grad_accum_steps, float8=parallel.float8, replica=replica)


def check_float8(parallel: ParallelConfig, device_type: str) -> None:
    """Refuse, in one line naming the setting, an FP8 run that cannot run here."""
    if parallel.float8 == "off":
        return
    if device_type != "cuda":
        raise ConfigError(f"parallel.float8={parallel.float8} needs a CUDA GPU with FP8 tensor cores (RTX 4090, "
                          "H100, H200); this run is on the CPU: set parallel.float8=off")
    if parallel.master_weights:
        raise ConfigError("parallel.float8 computes from the fp32 weights (torchao's float8 layers), so there are no "
                          "bf16 compute copies: set parallel.master_weights=false (or leave it unset)")
    if parallel.param_dtype != "bfloat16":
        raise ConfigError(f"parallel.float8={parallel.float8} runs beside bf16 compute: set parallel.param_dtype="
                          "bfloat16")
    capability = torch.cuda.get_device_capability()
    if capability < (8, 9):
        raise ConfigError(f"parallel.float8={parallel.float8}: {torch.cuda.get_device_name()} (compute capability "
                          f"{capability[0]}.{capability[1]}) has no FP8 tensor cores (8.9 or newer: RTX 4090, H100, "
                          "H200): set parallel.float8=off")
    try:
        import torchao.float8  # noqa: F401
    except ImportError as err:
        raise ConfigError(f"parallel.float8={parallel.float8} trains through torchao, which could not be imported "
                          f"({err}): pip install torchao, or set parallel.float8=off") from None


def apply_float8(model: Transformer, recipe: Literal["rowwise", "tensorwise"], fsdp: bool) -> None:
    """Swap the blocks' linear layers for torchao's float8 training layers, in place (before compile and FSDP, as
    torchtitan does). Their weights stay the same fp32 parameters under the same names, so state dicts and
    checkpoints are those of the bf16 model. The output projection is the tied embedding (`F.linear`, no module)
    and stays bf16, as does the fused loss. `fsdp` with 'tensorwise': the FSDP all-gathers carry float8 weights.

    NOTE: torchao's `module_filter_fn` also skips a layer whose dimensions are not multiples of 16, which FP8
    matmuls require (tiny test models)."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    config = Float8LinearConfig.from_recipe_name(recipe)
    if fsdp and recipe == "tensorwise":
        config = Float8LinearConfig(enable_fsdp_float8_all_gather=True)

    def convertible(module: nn.Module, fqn: str) -> bool:
        return (fqn.startswith("layers.") and isinstance(module, nn.Linear)
                and module.in_features % 16 == 0 and module.out_features % 16 == 0)

    convert_to_float8_training(model, config=config, module_filter_fn=convertible)


def parallelize(model: Transformer, mesh: DeviceMesh, plan: ParallelPlan) -> nn.Module:
    """Apply `plan` to a single-device model, in place: compute copies, activation checkpointing, compile,
    then FSDP2 or the plain module's compute dtype. Weights, their gradients and optimizer state stay fp32
    (with master weights, gradients arrive in bf16 on the copies)."""
    if mesh.size() != plan.world_size:
        raise ValueError(f"the parallel plan is for {plan.world_size} ranks, the mesh has {mesh.size()}")
    # NOTE: beside a replica, this model only evaluates, in bf16; the replica trains in FP8 (replica.py). Its float8
    # all-gather weights would reach the replica's gather as torchao's tensor subclass, a path not run anywhere yet.
    if plan.float8 != "off" and not plan.replica:
        apply_float8(model, plan.float8, plan.fsdp)
    if plan.master_weights:
        # NOTE: before compile, so the compiled graphs take the copies as their inputs from the first call.
        attach_compute_copies(model, DTYPES[plan.param_dtype])
    if not plan.replica:  # NOTE: with a replica, this model only evaluates: no checkpointing, no compile to wait for
        apply_activation_checkpointing(model, plan.activation_checkpointing)
        if plan.compile:
            apply_compile(model, plan.compile_memory_budget, plan.compile_scope, float8=plan.float8 != "off")
    if plan.fsdp:
        apply_fsdp(model, mesh, DTYPES[plan.param_dtype], DTYPES[plan.reduce_dtype],
                   reshard_after_forward=plan.reshard_after_forward, unit_blocks=plan.fsdp_unit_blocks)
    else:
        model.compute_dtype = DTYPES[plan.param_dtype]
    return model
