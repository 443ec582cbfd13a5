"""Pretraining entry point, runnable without Prefect or MLflow:

    torchrun --nproc_per_node N -m genesis_model.train --config configs/train/X.yaml [key=value ...]
             [--resume auto|PATH] [--stop-at-step N] [--reset-optimizer] [--reset-data]

or from Python, with a typed config: `from genesis_model.train import train; train(config, resume="auto")`.

Goes, in order: process group → parallel plan → data check → resume target and its compatibility → run
directory (created, locked, config.yaml written) → model → parallelize → optimizer → loader → checkpointer →
trainer (`build.py`) → (resume), then fits. Bad input exits non-zero with one line and writes nothing: every
check comes before the first write.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist

from genesis.config import TrainConfig, dump_yaml, load_config
from genesis.errors import CheckpointError, ConfigError, DataError, GenesisError, RunDirError
from genesis.manifest import verify_data_dir
from genesis.run_dir import DirLock, RunDir, latest_checkpoint, read_meta
from genesis_model.build import build, build_trainer
from genesis_model.callbacks import NonFiniteStop
from genesis_model.checkpoint import remove_incomplete
from genesis_model.distributed import init_distributed, resolve_device_type, shutdown_distributed
from genesis_model.launch import report_error
from genesis_model.metrics import MetricsSink, ProgressLine, RunDirSink
from genesis_model.optim import check_schedule_continues
from genesis_model.parallelize import plan_parallel, refresh_compute_copies


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
                        help="resume on changed data (new weights, sources added or dropped, more shards made with "
                             "the trunk's tokenizer, another window or seed): each source continues from its own "
                             "cursor, skipping the documents it has read in its current pass")
    return parser.parse_args(argv)


def lock_existing_run_dir(config: TrainConfig) -> DirLock | None:
    """Rank 0: lock the run directory if it exists already, before anything in it is read (another trainer's
    run is refused here); a new one is created and locked only once every check has passed."""
    run = RunDir(Path(config.run_dir))
    if not run.root.is_dir():
        return None
    lock = run.train_lock()
    lock.acquire()
    return lock


def prepare_run_dir(config: TrainConfig, lock: DirLock | None, config_source: str | Path | None = None) -> DirLock:
    """Rank 0, once every check has passed: create and lock the run directory, clear leftovers of interrupted
    saves, record the config. Nothing of a run is written before this."""
    run_dir = Path(config.run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        if lock is not None:
            lock.release()
        raise RunDirError(f"{run_dir}: run directory is not writable ({err.strerror}); choose a writable run_dir")
    if lock is None:
        lock = RunDir(run_dir).train_lock()
        lock.acquire()
    removed = remove_incomplete(run_dir)
    for path in removed:
        print(f"removed incomplete checkpoint {path}", file=sys.stderr)
    header = f"# resolved from {config_source}\n" if config_source else ""
    RunDir(run_dir).config.write_text(header + dump_yaml(config))
    return lock


def collective_check(fn, rank: int, share_result: bool = True):
    """Run `fn` on rank 0 and give every rank its outcome: the result (if `share_result`) or the same
    one-line error, so all ranks fail together instead of hanging in the next collective. The error other
    ranks raise carries `seen_by = 0`: rank 0 saw it and is the one that reports it (`exit_code`)."""
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
            try:
                raise error
            finally:
                # NOTE: unbound, as `except ... as` does: this frame, kept by the error's traceback, must not keep
                # the error (a cycle lives until a garbage collection, holding the caller's frames, the device
                # mesh and the process group's threads with them; see `exit_code`).
                del error
        kind, message = box[0]
        passed_on = {"RunDirError": RunDirError, "DataError": DataError, "CheckpointError": CheckpointError,
                     "ConfigError": ConfigError}.get(kind, GenesisError)(message)
        passed_on.seen_by = 0
        raise passed_on
    return result if rank == 0 else box[1]


def check_data(config: TrainConfig) -> dict:
    from genesis.manifest import MAX_UINT16_VOCAB

    # The recorded max token id per shard is trusted here (start-up stays cheap on large data); shards of older
    # manifests without one are read. `genesis data verify` reads every shard's ids.
    manifest = verify_data_dir(config.data_dir, check_checksums=config.verify_data_checksums, read_token_ids=False)
    if manifest.tokenizer.vocab_size > config.model.vocab_size:
        raise DataError(
            f"{Path(config.data_dir) / 'manifest.json'}: tokenizer vocab {manifest.tokenizer.vocab_size} exceeds the "
            f"model's vocab_size {config.model.vocab_size}; use a model preset with vocab_size ≥ "
            f"{manifest.tokenizer.vocab_size}"
        )
    if config.model.vocab_size > MAX_UINT16_VOCAB + 1:
        # uint16 shards cannot hold an id above 65,535: such a model was meant for another tokenizer, and the
        # embedding rows above it would never see a token.
        raise DataError(
            f"{Path(config.data_dir) / 'manifest.json'}: the shards hold uint16 token ids (at most 65,535) but the "
            f"model's vocab_size is {config.model.vocab_size}; use a model preset with vocab_size between "
            f"{manifest.tokenizer.vocab_size} and 65,536"
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
        trunk_tokenizer = Path((meta.get("config") or {}).get("data_dir") or "<the trunk's data_dir>") / "tokenizer"
        raise CheckpointError(
            f"{path}: trained with another tokenizer (sha256 {meta['tokenizer_sha256'][:12]} vs "
            f"{run_meta['tokenizer_sha256'][:12]}); re-prepare the data with the checkpoint's tokenizer "
            f"(`genesis data prepare ... tokenizer.existing={trunk_tokenizer}`) or point data_dir at shards made with it"
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
    if (jump := check_schedule_continues(meta.get("config"), run_meta["config"], int(meta["step"]))) is not None:
        raise CheckpointError(f"{path}: {jump}")  # a longer cosine run re-warms only by choice (extended_from)


def resolve_resume(resume: str | None, run_dir: Path) -> Path | None:
    if resume is None:
        # A start without --resume in a directory that holds a run would begin at step 0 over it (its config.yaml
        # replaced, its rolling checkpoints pruned by the new ones): refused, never silent.
        if (ref := latest_checkpoint(run_dir)) is not None:
            raise RunDirError(f"{run_dir}: already holds a run (newest checkpoint: step {ref.step}); pass --resume auto "
                              f"to continue it, or give this run its own run_dir=... (a fresh start here would restart "
                              f"at step 0 over it)")
        return None
    if resume == "auto":
        ref = latest_checkpoint(run_dir)
        return ref.path if ref else None
    path = Path(resume)
    read_meta(path)  # raises a clear error for a missing or incomplete checkpoint
    return path


def train(config: TrainConfig, *, resume: str | Path | None = None, stop_at_step: int | None = None,
          reset_optimizer: bool = False, reset_data: bool = False, config_source: str | Path | None = None) -> str:
    """Train `config` as one rank of a torchrun job (or alone). Returns 'completed', 'paused' or
    'stopped_by_signal'. Bad input raises a one-line `GenesisError` before any checkpoint is touched; K
    non-finite steps in a row raise `NonFiniteStop`. (`main` turns all of them into exit codes.)

    `resume`: 'auto' (the run's newest complete checkpoint, if any) or a checkpoint directory;
    `stop_at_step`: save and return after this step, keeping the schedule of max_steps (pause a run);
    `reset_optimizer`: resume the weights with a fresh optimizer (needed for a model-only checkpoint);
    `reset_data`: resume on changed data (a new mixture): the data binding is reset, not the position: each
    source continues from its own cursor (`TokenLoader.continue_from`), so the documents read in its current pass
    are not read again while unread ones remain; `config_source`: where the config came from, noted in the run
    directory's config.yaml."""
    os.environ.update(config.env)
    device_type = resolve_device_type(config.device)
    info = init_distributed(device_type, timeout_s=config.parallel.nccl_timeout_s)
    lock = None
    sinks: list[MetricsSink] = []
    try:
        # Everything is checked before anything is written: a refused start leaves the run directory as it was
        # (or absent). Decided first: a setting this world size cannot run.
        plan = plan_parallel(config.parallel, info.world_size, device_type, config.grad_accum_steps)
        lock = collective_check(lambda: lock_existing_run_dir(config), info.rank, share_result=False)
        data_meta = collective_check(lambda: check_data(config), info.rank)
        run_meta = {
            "model_config": config.model.model_dump(),
            "model_fingerprint": config.model.fingerprint(),
            "meaning": config.meaning(),
            "config": json.loads(config.model_dump_json()),
            # What 'auto' and unset settings became for this world size and device.
            "parallel_resolved": plan.record(),
            **data_meta,
        }
        resume_path = collective_check(lambda: resolve_resume(resume, Path(config.run_dir)), info.rank)
        if resume_path is not None:
            collective_check(lambda: check_resume_compatible(read_meta(resume_path), run_meta, resume_path,
                                                             reset_data), info.rank, share_result=False)
        lock = collective_check(lambda: prepare_run_dir(config, lock, config_source), info.rank, share_result=False)

        parts = build(config, info, plan=plan, empty_weights=resume_path is not None)
        if info.is_main:
            sinks += [RunDirSink(Path(config.run_dir)), ProgressLine(config.max_steps)]
        trainer = build_trainer(config, info, parts, sinks, run_meta)

        if resume_path is not None:
            meta, rank_state = trainer.checkpointer.load(resume_path, parts.model, parts.optimizer,
                                                         reset_optimizer=reset_optimizer)
            refresh_compute_copies(parts.model)  # the loaded fp32 weights, in the bf16 copies (master weights)
            carried = rank_state.pop("loader", None) if reset_data else None
            trainer.restore(meta, rank_state)
            notes = trainer.loader.continue_from(carried) if carried is not None else []
            trainer.event("resumed", path=str(resume_path), step=trainer.step, world_size=info.world_size,
                          saved_world_size=meta["world_size"], **trainer.checkpointer.last_load_s)
            if reset_optimizer:
                trainer.event("optimizer_reset", path=str(resume_path))
                if info.is_main:
                    print(f"WARNING: optimizer reset at step {trainer.step}: AdamW moments restart from zero "
                          f"(--reset-optimizer)", file=sys.stderr)
            if reset_data:
                repetition = {name: round(value, 4) for name, value in trainer.loader.repetition().items()}
                trainer.event("data_reset", path=str(resume_path), repetition=repetition, notes=notes)
                if info.is_main:
                    print(f"data: each source continues where it stopped (passes read: {repetition})"
                          + "".join(f"; {note}" for note in notes), file=sys.stderr)
            if info.is_main:
                print(f"resumed from {resume_path} at step {trainer.step}", file=sys.stderr)
        return trainer.fit(stop_at_step=stop_at_step)
    finally:
        for sink in sinks:
            sink.close()
        if lock is not None:
            lock.release()
        shutdown_distributed()


def _is_collective_failure(err: RuntimeError) -> bool:
    """NCCL reports a failed or timed-out collective as a DistError; gloo as a plain RuntimeError naming gloo."""
    return isinstance(err, dist.DistError) or "gloo" in str(err) or "Timed out" in str(err)


def exit_code(run: Callable[[], str]) -> int:
    """Run a training call as the command line does: 0 once completed or paused, 143 when stopped by a signal;
    otherwise one `error:` line and bad input's own code (2), 3 for non-finite steps, 4 for a failed collective.

    The line goes through `report_error`: under `genesis train --nproc N` the launcher prints the one from the
    rank that saw the cause; under plain torchrun a rank that was passed rank 0's error stays quiet."""
    code = _run_and_report(run)
    # NOTE: `destroy_process_group` unregisters the process group but its gloo worker threads live on while the
    # device mesh does, and the mesh is held by reference cycles (the model's DTensors, the trainer, a failed
    # check's traceback) that only a garbage collection frees. Left to interpreter shutdown, a worker dropping
    # the last collective's tensors needs the GIL, is ended by the finalizing interpreter, and the process
    # aborts after its last line ("terminate called without an active exception"). Freed here, the threads
    # are joined while Python is alive.
    gc.collect()
    return code


def _run_and_report(run: Callable[[], str]) -> int:
    rank = int(os.environ.get("RANK", "0"))
    try:
        status = run()
    except GenesisError as err:
        report_error(str(err), err.exit_code, seen_by=getattr(err, "seen_by", rank))
        return err.exit_code
    except NonFiniteStop as err:
        report_error(str(err), 3, seen_by=rank)
        return 3
    except RuntimeError as err:
        if not _is_collective_failure(err):
            raise
        # NOTE: a collective fails when another rank has failed and left (its own error is the cause), and one
        # that times out (a rank stuck or gone) raises here after `parallel.nccl_timeout_s` instead of hanging;
        # either way this rank saw a symptom: say so in one line, not a 200-line traceback per rank.
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        report_error(f"rank {rank}: a collective failed ({type(err).__name__}: {first_line[:300]}); another rank "
                     f"failed (its error is the cause) or is stuck or gone (parallel.nccl_timeout_s bounds the "
                     f"wait); complete checkpoints are kept: fix the cause, then --resume auto", 4, seen_by=None)
        return 4
    return 0 if status in ("completed", "paused") else 143


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return exit_code(lambda: train(load_config(TrainConfig, args.config, args.overrides), resume=args.resume,
                                   stop_at_step=args.stop_at_step, reset_optimizer=args.reset_optimizer,
                                   reset_data=args.reset_data, config_source=args.config))


if __name__ == "__main__":
    sys.exit(main())
