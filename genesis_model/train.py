"""Pretraining entry point, runnable without Prefect or MLflow:

    torchrun --nproc_per_node N -m genesis_model.train --config configs/train/X.yaml [key=value ...]
             [--resume auto|PATH] [--reset-optimizer] [--reset-data]

Builds, in order: config → process group → run-directory lock → model → parallelize → optimizer → loader →
checkpointer → (resume) → trainer, then fits. Bad input exits non-zero with one line and touches no
checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from genesis.config import TrainConfig, dump_yaml, load_config
from genesis.errors import CheckpointError, ConfigError, DataError, GenesisError, RunDirError
from genesis.manifest import verify_data_dir
from genesis.run_dir import CONFIG, DirLock, RunDir, latest_checkpoint, read_meta
from genesis_model.checkpoint import Checkpointer, remove_incomplete
from genesis_model.distributed import (
    collective_timeout,
    init_distributed,
    resolve_device_type,
    shutdown_distributed,
)
from genesis_model.loader import TokenLoader
from genesis_model.metrics import MetricsSink, RunDirSink
from genesis_model.model import Transformer
from genesis_model.optim import build_optimizer
from genesis_model.parallelize import parallelize, refresh_compute_copies
from genesis_model.trainer import NonFiniteStop, Trainer

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="genesis train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, type=Path, help="configs/train/*.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. max_steps=300")
    parser.add_argument("--resume", default=None,
                        help="'auto' (newest complete checkpoint of the run, if any) or a checkpoint directory")
    parser.add_argument("--reset-optimizer", action="store_true",
                        help="resume the weights with a fresh optimizer (logged); needed for a model-only checkpoint")
    parser.add_argument("--stop-at-step", type=int, default=None,
                        help="save and exit after this step, keeping the schedule of max_steps (pause a run)")
    parser.add_argument("--reset-data", action="store_true",
                        help="resume with the loader at the start of (possibly new) data, e.g. a changed mixture")
    return parser.parse_args(argv)


def prepare_run_dir(config: TrainConfig, config_path: Path) -> DirLock:
    """Rank 0: create and lock the run directory, clear leftovers of interrupted saves, record the config."""
    run_dir = Path(config.run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise RunDirError(f"{run_dir}: run directory is not writable ({err.strerror}); choose a writable run_dir")
    lock = RunDir(run_dir).train_lock()
    lock.acquire()
    removed = remove_incomplete(run_dir)
    for path in removed:
        print(f"removed incomplete checkpoint {path}", file=sys.stderr)
    (run_dir / CONFIG).write_text(f"# resolved from {config_path}\n" + dump_yaml(config))
    return lock


def collective_check(fn, rank: int, share_result: bool = True):
    """Run `fn` on rank 0 and give every rank its outcome: the result (if `share_result`) or the same
    one-line error, so all ranks fail together instead of hanging in the next collective."""
    result, error = None, None
    if rank == 0:
        try:
            result = fn()
        except GenesisError as err:
            error = err
    box = [None if error is None else (type(error).__name__, str(error)), result if share_result else None]
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        if error is not None:
            raise error
        kind, message = box[0]
        raise {"RunDirError": RunDirError, "DataError": DataError, "CheckpointError": CheckpointError,
               "ConfigError": ConfigError}.get(kind, GenesisError)(message)
    return result if rank == 0 else box[1]


def check_data(config: TrainConfig) -> dict:
    manifest = verify_data_dir(config.data_dir, check_checksums=config.verify_data_checksums)
    if manifest.tokenizer.vocab_size > config.model.vocab_size:
        raise DataError(
            f"{Path(config.data_dir) / 'manifest.json'}: tokenizer vocab {manifest.tokenizer.vocab_size} exceeds the "
            f"model's vocab_size {config.model.vocab_size}; use a model preset with vocab_size ≥ "
            f"{manifest.tokenizer.vocab_size}"
        )
    return {"tokenizer_sha256": manifest.tokenizer.sha256, "data_fingerprint": manifest.fingerprint()}


def check_resume_compatible(meta: dict, run_meta: dict, path: Path, reset_data: bool) -> None:
    """Refuse a checkpoint that belongs to another model, tokenizer, or data order. Provenance a checkpoint
    does not record (weights imported with `genesis import-hf`) is not compared."""
    if meta["model_fingerprint"] != run_meta["model_fingerprint"]:
        raise CheckpointError(
            f"{path}: model shapes differ (checkpoint {meta['model_config'].get('name')} "
            f"{meta['model_fingerprint']} vs config {run_meta['model_fingerprint']}); use the checkpoint's model config"
        )
    if meta.get("tokenizer_sha256") is not None and meta["tokenizer_sha256"] != run_meta["tokenizer_sha256"]:
        raise CheckpointError(
            f"{path}: trained with another tokenizer (sha256 {meta['tokenizer_sha256'][:12]} vs "
            f"{run_meta['tokenizer_sha256'][:12]}); point data_dir at shards made with the checkpoint's tokenizer"
        )
    if not reset_data and meta.get("meaning") is not None:
        for key in ("window", "seed"):
            if meta["meaning"][key] != run_meta["meaning"][key]:
                raise CheckpointError(
                    f"{path}: {key} changed ({meta['meaning'][key]} → {run_meta['meaning'][key]}), which changes "
                    f"what the data position means; restore it or pass --reset-data"
                )
        if meta.get("data_fingerprint") is not None and meta["data_fingerprint"] != run_meta["data_fingerprint"]:
            raise CheckpointError(
                f"{path}: the data differs from the checkpoint's (mixture or shards changed); pass --reset-data "
                f"to continue the trunk on the new data"
            )


def resolve_resume(resume: str | None, run_dir: Path) -> Path | None:
    if resume is None:
        return None
    if resume == "auto":
        ref = latest_checkpoint(run_dir)
        return ref.path if ref else None
    path = Path(resume)
    read_meta(path)  # raises a clear error for a missing or incomplete checkpoint
    return path


def run(args: argparse.Namespace, extra_sinks: list[MetricsSink] | None = None) -> str:
    config = load_config(TrainConfig, args.config, args.overrides)
    os.environ.update(config.env)
    device_type = resolve_device_type(config.device)
    info = init_distributed(device_type, timeout_s=config.parallel.nccl_timeout_s)
    lock = None
    try:
        # Decided first: an explicit setting this world size cannot run stops here, before anything is written.
        compile_scope, master_weights = config.parallel.resolved(info.world_size, device_type)
        lock = collective_check(lambda: prepare_run_dir(config, args.config), info.rank, share_result=False)
        data_meta = collective_check(lambda: check_data(config), info.rank)
        resume_path = collective_check(lambda: resolve_resume(args.resume, Path(config.run_dir)), info.rank)

        torch.manual_seed(config.seed + info.rank)
        if resume_path is None:
            model = Transformer(config.model)
            model.init_weights(seed=config.seed)
            model = model.to(info.device)
        else:
            # NOTE: a resumed run overwrites every weight, so skip drawing 1B random numbers on the CPU: build
            # on the meta device and only allocate (RoPE tables are derived from the config, not loaded).
            with torch.device("meta"):
                model = Transformer(config.model)
            model = model.to_empty(device=info.device)
            model.reset_rope_tables()
        num_params = model.num_params()
        parallel = config.parallel
        use_compile = parallel.compile and device_type == "cuda"
        # NOTE: CPU runs compute in fp32, except with master_weights, which only exist in bf16 (and are tested so).
        param_dtype = parallel.param_dtype if device_type == "cuda" or master_weights else "float32"
        parallelize(model, info.mesh, param_dtype=param_dtype, reduce_dtype=parallel.reduce_dtype,
                    compile=use_compile, activation_checkpointing=parallel.activation_checkpointing,
                    compile_memory_budget=parallel.compile_memory_budget, one_rank=parallel.one_rank,
                    compile_scope=compile_scope, fsdp_unit_blocks=parallel.fsdp_unit_blocks,
                    master_weights=master_weights)
        optimizer = build_optimizer(model, config.optimizer, device_type)
        loader = TokenLoader(config.data_dir, config.window, config.micro_batch_size, info.rank, info.world_size,
                             config.seed, config.eval.holdout_docs_per_source)

        async_save = config.checkpoint.async_save if config.checkpoint.async_save is not None else device_type == "cuda"
        # NOTE: async saves run their collectives from a background thread; on NCCL they get a separate gloo
        # group so they never interleave with the training step's collectives.
        checkpoint_group = dist.new_group(backend="gloo") if device_type == "cuda" else None
        checkpointer = Checkpointer(Path(config.run_dir), info.rank, info.world_size, config.checkpoint.keep_last,
                                    async_save, process_group=checkpoint_group)
        # The trainer's own small reductions of host numbers (peak memory over ranks): gloo, so they never wait
        # for the GPU, and a group of their own, so they never interleave with a background save's collectives.
        # NOTE: the same timeout as the world group; new_group's own default would be gloo's 30 minutes.
        host_group = (dist.new_group(backend="gloo", timeout=collective_timeout(config.parallel.nccl_timeout_s))
                      if info.world_size > 1 else None)
        run_meta = {
            "model_config": config.model.model_dump(),
            "model_fingerprint": config.model.fingerprint(),
            "meaning": config.meaning(),
            "config": json.loads(config.model_dump_json()),
            # What 'auto' and unset settings became for this world size and device.
            "parallel_resolved": {"compile_scope": compile_scope, "master_weights": master_weights,
                                  "compile": use_compile, "param_dtype": param_dtype},
            **data_meta,
        }
        sinks: list[MetricsSink] = []
        if info.is_main:
            sinks.append(RunDirSink(Path(config.run_dir)))
            sinks.extend(extra_sinks or [])
        trainer = Trainer(config, info, model, optimizer, loader, checkpointer, sinks, run_meta, num_params,
                          host_group=host_group)

        if resume_path is not None:
            meta = read_meta(resume_path)
            collective_check(lambda: check_resume_compatible(meta, run_meta, resume_path, args.reset_data), info.rank,
                             share_result=False)
            meta, rank_state = checkpointer.load(resume_path, model, optimizer, reset_optimizer=args.reset_optimizer)
            refresh_compute_copies(model)  # the loaded fp32 weights, in the bf16 copies (master_weights)
            if args.reset_data:
                rank_state.pop("loader", None)
            trainer.restore(meta, rank_state)
            trainer.event("resumed", path=str(resume_path), step=trainer.step, world_size=info.world_size,
                          saved_world_size=meta["world_size"])
            if args.reset_optimizer:
                trainer.event("optimizer_reset", path=str(resume_path))
                if info.is_main:
                    print(f"WARNING: optimizer reset at step {trainer.step}: AdamW moments restart from zero "
                          f"(--reset-optimizer)", file=sys.stderr)
            if args.reset_data:
                trainer.event("data_reset", path=str(resume_path))
            if info.is_main:
                print(f"resumed from {resume_path} at step {trainer.step}", file=sys.stderr)
        status = trainer.fit(stop_at_step=args.stop_at_step)
        for sink in sinks:
            sink.close()
        return status
    finally:
        if lock is not None:
            lock.release()
        shutdown_distributed()


def _is_collective_failure(err: RuntimeError) -> bool:
    """NCCL reports a failed or timed-out collective as a DistError; gloo as a plain RuntimeError naming gloo."""
    return isinstance(err, dist.DistError) or "gloo" in str(err) or "Timed out" in str(err)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        status = run(args)
    except GenesisError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except NonFiniteStop as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    except RuntimeError as err:
        if not _is_collective_failure(err):
            raise
        # NOTE: a collective that times out (a rank stuck or gone) raises here after `parallel.nccl_timeout_s`
        # instead of hanging; say which rank saw it and what survives, not a 200-line traceback per rank.
        rank = os.environ.get("RANK", "0")
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"error: rank {rank}: a collective failed ({type(err).__name__}: {first_line[:300]}); another rank "
              f"is stuck or gone (parallel.nccl_timeout_s bounds the wait); complete checkpoints are kept: "
              f"fix the cause, then --resume auto", file=sys.stderr)
        return 4
    return 0 if status in ("completed", "paused") else 143


if __name__ == "__main__":
    sys.exit(main())
