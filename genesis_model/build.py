"""Build one rank's training run, in the order the pieces depend on each other: parallel plan → model →
parallelize → optimizer → loader (`build`), then checkpointer → trainer (`build_trainer`).

`train.train` builds through it, and so does `bench/train_step.py`, so the benchmark measures the model and
optimizer the trainer runs, laid out by the same plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from genesis.config import TrainConfig
from genesis_model.callbacks import standard_callbacks
from genesis_model.checkpoint import Checkpointer
from genesis_model.distributed import DistInfo, collective_timeout
from genesis_model.loader import TokenLoader
from genesis_model.metrics import MetricsSink
from genesis_model.model import Transformer
from genesis_model.optim import build_optimizer
from genesis_model.parallelize import DTYPES, ParallelPlan, parallelize, plan_parallel
from genesis_model.replica import Replica, build_replica
from genesis_model.trainer import Trainer


@dataclass
class Parts:
    """What `build` returns: the pieces of one rank's training step."""

    plan: ParallelPlan
    model: nn.Module
    optimizer: torch.optim.Optimizer
    num_params: int
    loader: TokenLoader | None
    replica: Replica | None = None  # what the micro-steps run on, if not `model` (`parallel.micro_steps`)


def build(config: TrainConfig, dist_info: DistInfo, *, plan: ParallelPlan | None = None, empty_weights: bool = False,
          with_loader: bool = True) -> Parts:
    """Seed this rank, then build and lay out the model, its optimizer and (`with_loader`) the token loader.

    `plan`: decided already (`train.train` decides it before it touches the run directory, so a setting that
    cannot run writes nothing); None: decided here, from `config.parallel`. `empty_weights`: allocate the
    weights without drawing an initialisation, for a checkpoint load that overwrites them all."""
    if plan is None:
        plan = plan_parallel(config.parallel, dist_info.world_size, dist_info.device.type, config.grad_accum_steps)
    torch.manual_seed(config.seed + dist_info.rank)
    if empty_weights:
        # NOTE: drawing 1B random numbers on the CPU takes a while; on the meta device the model is only
        # allocated (RoPE tables are derived from the config, not loaded, so they are computed here).
        with torch.device("meta"):
            model = Transformer(config.model)
        model = model.to_empty(device=dist_info.device)
        model.reset_rope_tables()
    else:
        model = Transformer(config.model)
        model.init_weights(seed=config.seed)
        model = model.to(dist_info.device)
    num_params = model.num_params()
    parallelize(model, dist_info.mesh, plan)
    replica = (Replica(model, build_replica(config.model, dist_info.device, plan), DTYPES[plan.reduce_dtype])
               if plan.replica else None)
    optimizer = build_optimizer(model, config.optimizer, plan)
    loader = (TokenLoader(config.data_dir, config.window, config.micro_batch_size, dist_info.rank,
                          dist_info.world_size, config.seed, config.eval.holdout_docs_per_source)
              if with_loader else None)
    return Parts(plan=plan, model=model, optimizer=optimizer, num_params=num_params, loader=loader, replica=replica)


def build_trainer(config: TrainConfig, dist_info: DistInfo, parts: Parts, sinks: list[MetricsSink],
                  run_meta: dict) -> Trainer:
    """The checkpointer and the trainer around built `parts`, with the standard callbacks. Every rank calls it
    (it creates process groups)."""
    device_type = dist_info.device.type
    async_save = config.checkpoint.async_save if config.checkpoint.async_save is not None else device_type == "cuda"
    # NOTE: async saves run their collectives from a background thread, so checkpoints get a gloo group of their
    # own on every backend: sharing gloo's default group with the training step's collectives (CPU runs)
    # interleaved the two streams of collectives and aborted at the first async save (gloo "op.preamble.length").
    # (One rank too: DCP's async save needs a CPU backend, which an NCCL-only default group lacks.)
    checkpoint_group = dist.new_group(backend="gloo", timeout=collective_timeout(config.parallel.nccl_timeout_s))
    checkpointer = Checkpointer(Path(config.run_dir), dist_info.rank, dist_info.world_size,
                                config.checkpoint.keep_last, async_save, process_group=checkpoint_group,
                                writer_threads=config.checkpoint.writer_threads,
                                archive_weights=config.checkpoint.archive_weights)
    # The trainer's own small reductions of host numbers (peak memory over ranks): gloo, so they never wait
    # for the GPU, and a group of their own, so they never interleave with a background save's collectives.
    # NOTE: the same timeout as the world group; new_group's own default would be gloo's 30 minutes.
    host_group = (dist.new_group(backend="gloo", timeout=collective_timeout(config.parallel.nccl_timeout_s))
                  if dist_info.world_size > 1 else None)
    callbacks = standard_callbacks(config, dist_info, parts.num_params, host_group)
    return Trainer(config, dist_info, parts.plan, parts.model, parts.optimizer, parts.loader, checkpointer, sinks,
                   run_meta, callbacks, replica=parts.replica)
