"""Sharded, crash-proof checkpoints (torch.distributed.checkpoint) and everything a resume needs.

What a checkpoint holds, listed once:
  DCP files      model AND optimizer state, each rank writing its own shards (never a full-state
                 all-gather to rank 0: that deadlocked the reference run over PCIe).
  trainer/       one `rank_NNNNN.pt` per rank: loader position and RNG states (python, numpy, torch CPU,
                 CUDA), saved with plain types and tensors only, so `torch.load(weights_only=True)` reads it.
  meta.json      step, tokens seen, world size, model config and fingerprint, tokenizer and data hashes,
                 whether optimizer state is present, the run's resolved config.
  hashes/        each rank's digests of the shard files it wrote, taken as the bytes went out (checkpoint_io.py).
  COMPLETE.json  written last: every file with its size and xxh3-128 digest. No marker, no checkpoint.

How it is written: into `<parent>/.tmp-step_N/`, renamed to `<parent>/step_N/`, then the marker. A crash at
any point leaves either a complete checkpoint or a directory without a marker, which resume ignores and the
next start removes. Old rolling checkpoints are renamed to `.trash-*` before deletion, so a half-deleted
directory never still carries its marker. Milestones live in `milestones/` and are never removed; nor are the
weights-only bf16 archives in `archive/` (`checkpoint.archive_weights`), each written from a complete checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from genesis.errors import CheckpointError
from genesis_model.checkpoint_io import (HashingWriter, SafeLoadPlanner, SafeReader, digests_for_marker,
                                         read_metadata_safely, verify_files)
from genesis.run_dir import (
    ARCHIVE_DIR,
    MARKER,
    META,
    MILESTONE_DIR,
    ROLLING_DIR,
    CheckpointRef,
    is_complete,
    list_checkpoints,
    read_meta,
    step_dir_name,
)

CHECKPOINT_VERSION = 1
DELAY_SAVE_ENV = "GENESIS_DELAY_SAVE"


@contextmanager
def _one_process():
    """DCP without a process group, on purpose (no_dist=True): its warning that it assumes so tells no one anything."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _injected_save_delay(rank: int) -> None:
    """Fault injection for the no-hang check (bench/two_gpu.py): `GENESIS_DELAY_SAVE=RANK:SECONDS` makes that
    rank arrive late at a checkpoint's first collective, as a rank stuck on a slow disk would."""
    spec = os.environ.get(DELAY_SAVE_ENV, "")
    if spec:
        delayed_rank, seconds = spec.split(":")
        if int(delayed_rank) == rank:
            time.sleep(float(seconds))


# -------------------------------------------------------------------------------------------------------------
# Finding and validating


def verify_checkpoint(path: Path) -> None:
    """Every file the marker lists exists with its size and digest (read in parallel threads)."""
    path = Path(path)
    if not is_complete(path):
        raise CheckpointError(f"{path}: no {MARKER}; not a complete checkpoint (an interrupted save?): use another")
    marker = json.loads((path / MARKER).read_text())
    verify_files(path, marker["files"])


def remove_incomplete(run_dir: Path) -> list[Path]:
    """Delete leftovers of interrupted saves and deletions (rank 0, at start, under the run lock): temporary and
    trash directories anywhere, and rolling checkpoints without a marker. A milestone directory is never
    removed, complete or not: milestones are immutable, and one without its marker is left for a person to
    look at (resume ignores it, and saving that step again replaces it)."""
    removed = []
    for sub in (ROLLING_DIR, MILESTONE_DIR, ARCHIVE_DIR):
        for path in (Path(run_dir) / sub).glob("*"):
            interrupted = path.name.startswith((".tmp-", ".trash-"))
            unmarked_rolling = sub == ROLLING_DIR and path.is_dir() and not is_complete(path)
            if interrupted or unmarked_rolling:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def has_optimizer_state(path: Path) -> bool:
    """Ask the DCP metadata itself, not meta.json: a checkpoint lacking optimizer tensors cannot claim them."""
    metadata = read_metadata_safely(Path(path) / ".metadata")
    return any(key.startswith("optimizer.") for key in metadata.state_dict_metadata)


# -------------------------------------------------------------------------------------------------------------
# Per-rank state (RNG and loader) in weights_only-loadable form


def capture_rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": _to_plain(random.getstate()),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(_to_tuple(state["python"]))
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _to_plain(value):
    return [_to_plain(v) for v in value] if isinstance(value, tuple) else value


def _to_tuple(value):
    return tuple(_to_tuple(v) for v in value) if isinstance(value, list) else value


# -------------------------------------------------------------------------------------------------------------


class Checkpointer:
    """Saves and loads a run's checkpoints. Every rank calls `save` and `load`; rank 0 does the renames,
    markers and pruning. At most one asynchronous save is in flight; `wait()` finishes it."""

    def __init__(self, run_dir: Path, rank: int, world_size: int, keep_last: int, async_save: bool,
                 process_group=None, on_saved=None, writer_threads: int = 8, archive_weights: bool = False):
        self.run_dir = Path(run_dir)
        self.rank, self.world_size = rank, world_size
        self.keep_last = keep_last
        self.async_save = async_save
        self.process_group = process_group
        self.writer_threads = writer_threads
        self.archive_weights = archive_weights
        self.on_saved = on_saved  # callback(CheckpointRef, seconds) on rank 0 once a checkpoint is complete
        self._pending: tuple[object, threading.Thread | None] | None = None
        self._failure: tuple[int, BaseException] | None = None
        self.last_saved: CheckpointRef | None = None
        self.last_load_s: dict[str, float] = {}  # seconds the last load spent verifying and reading
        self.last_phases: dict[str, float] = {}  # when the last complete save was staged and written
        # NOTE: on CUDA, async saves stage into pinned host buffers allocated once and kept (the writer's cached
        # staged state dict), then write from them in the background. The copy itself blocks training (~1 s
        # for genesis-1b); allocating 11 GiB of fresh pinned memory per save, as a new DefaultStager does (one
        # stager could not be reused: torch 2.11 failed on the second save with a KeyError in its cached
        # staging plan), took 6-8 s of every save on an H200 (bench/checkpoint.py).
        self.cached_staging = async_save and torch.cuda.is_available()
        self._writer: HashingWriter | None = None

    # ---------------------------------------------------------------------------------------------------------

    def save(self, step: int, model, optimizer, rank_state: dict, meta: dict, milestone: bool = False,
             include_optimizer: bool = True) -> float:
        """Start (async) or complete (sync) a checkpoint at `step`. Returns seconds the caller was blocked."""
        started = time.perf_counter()
        self.wait()
        parent = self.run_dir / (MILESTONE_DIR if milestone else ROLLING_DIR)
        final = parent / step_dir_name(step)
        tmp = parent / f".tmp-{step_dir_name(step)}"
        if self.rank == 0:
            if final.exists() and milestone and is_complete(final):
                raise CheckpointError(f"{final}: milestone exists and is immutable; it will not be overwritten")
            parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        _injected_save_delay(self.rank)
        dist.barrier()

        (tmp / "trainer").mkdir(exist_ok=True)
        torch.save(rank_state, tmp / "trainer" / f"rank_{self.rank:05d}.pt")
        state = {"model": get_model_state_dict(model)}
        if include_optimizer:
            state["optimizer"] = get_optimizer_state_dict(model, optimizer)
        meta = {**meta, "version": CHECKPOINT_VERSION, "step": step, "world_size": self.world_size,
                "has_optimizer": include_optimizer, "milestone": milestone}

        phases: dict[str, float] = {}  # seconds from the save call: staged (async on CUDA), written, complete

        def finalize():
            phases["written_s"] = round(time.perf_counter() - started, 3)
            if self.rank == 0:
                self._finalize(tmp, final, meta)
                self.last_phases = phases
                if self.on_saved:
                    self.on_saved(CheckpointRef(final, step, milestone), time.perf_counter() - started)
                if self.archive_weights:
                    archive_weights(final, self.run_dir / ARCHIVE_DIR / final.name, self.writer_threads)
                self._prune()  # after: deleting an old 11 GiB checkpoint took seconds that are not this save's
            self.last_saved = CheckpointRef(final, step, milestone)

        if self.async_save:
            if self.cached_staging:
                if self._writer is None:
                    self._writer = HashingWriter(tmp, self.writer_threads, cache_staged_state_dict=True)
                future = dcp.async_save(state, checkpoint_id=str(tmp), storage_writer=self._writer,
                                        process_group=self.process_group)
            else:
                future = dcp.async_save(state, storage_writer=HashingWriter(tmp, self.writer_threads),
                                        process_group=self.process_group)
            phases["staged_s"] = round(time.perf_counter() - started, 3)

            def complete():
                try:
                    future.result()
                    finalize()
                except BaseException as err:  # surfaced by wait(): a failed save must never pass silently
                    self._failure = (step, err)

            thread = threading.Thread(target=complete, name=f"checkpoint-{step}", daemon=False)
            thread.start()
            self._pending = (future, thread)
        else:
            dcp.save(state, storage_writer=HashingWriter(tmp, self.writer_threads), process_group=self.process_group)
            finalize()
            dist.barrier()
        return time.perf_counter() - started

    def close(self) -> None:
        self.wait()

    def wait(self) -> None:
        """Block until the in-flight save (if any) is complete on this rank."""
        if self._pending is not None:
            _, thread = self._pending
            thread.join()
            self._pending = None
        if self._failure is not None:
            step, err = self._failure
            self._failure = None
            raise CheckpointError(f"asynchronous checkpoint of step {step} failed ({type(err).__name__}: "
                                  f"{str(err).splitlines()[0] if str(err) else ''}); earlier checkpoints are intact") from err

    def _finalize(self, tmp: Path, final: Path, meta: dict) -> None:
        (tmp / META).write_text(json.dumps(meta, indent=2, default=str))
        if final.exists():  # a rolling checkpoint of the same step from an earlier, abandoned attempt
            trash = final.with_name(f".trash-{final.name}")
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(tmp, final)
        files = digests_for_marker(final)
        marker_tmp = final / f".{MARKER}.tmp"
        with open(marker_tmp, "w") as handle:
            json.dump({"step": meta["step"], "files": files, "completed": time.time()}, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(marker_tmp, final / MARKER)

    def _prune(self) -> None:
        rolling = [ref for ref in list_checkpoints(self.run_dir) if not ref.milestone]
        for ref in rolling[: max(0, len(rolling) - self.keep_last)]:
            trash = ref.path.with_name(f".trash-{ref.path.name}")
            os.replace(ref.path, trash)  # atomic: the checkpoint is gone before any of its files are
            shutil.rmtree(trash, ignore_errors=True)

    # ---------------------------------------------------------------------------------------------------------

    def load(self, path: Path, model, optimizer, reset_optimizer: bool = False, verify: bool = True) -> tuple[dict, dict]:
        """Load model and optimizer state (resharding to this world size) and this rank's trainer state.

        Refuses a checkpoint without optimizer state unless `reset_optimizer`: restarting AdamW's moments at
        zero silently wrecks a run (the reference run's loss went 1.2 → 2.2 while grad norm fell).
        """
        path = Path(path)
        meta = read_meta(path)
        started = time.perf_counter()
        if verify and self.rank == 0:
            verify_checkpoint(path)
        dist.barrier()
        verified = time.perf_counter()
        optimizer_present = has_optimizer_state(path)
        if not optimizer_present and not reset_optimizer:
            raise CheckpointError(
                f"{path}: checkpoint has no optimizer state, so AdamW would restart from zero moments; resume "
                f"from a full checkpoint, or pass --reset-optimizer to accept a fresh optimizer explicitly"
            )
        state = {"model": get_model_state_dict(model)}
        load_optimizer = optimizer_present and not reset_optimizer
        if load_optimizer:
            # NOTE: a fresh optimizer has no state to load into, so DCP makes it with one step at lr 0. That step
            # runs eagerly: the engine's compiled AdamW update would otherwise be traced and compiled here for
            # fp32 zero gradients, a graph no training step uses (they bring bf16 gradients), which took most of
            # the 44 s this load spent on an H200 (bench/checkpoint.py).
            with torch.compiler.set_stance("force_eager"):
                state["optimizer"] = get_optimizer_state_dict(model, optimizer)
        prepared = time.perf_counter()
        dcp.load(state, storage_reader=SafeReader(str(path), self.writer_threads),
                 planner=SafeLoadPlanner(), process_group=self.process_group)
        read = time.perf_counter()
        set_model_state_dict(model, state["model"])
        if load_optimizer:
            set_optimizer_state_dict(model, optimizer, state["optimizer"])

        done = time.perf_counter()
        # read_s: everything after verification; of which prepare_s (state dicts, the optimizer's initial state),
        # dcp_read_s (the bytes into place) and apply_s (the state dicts into model and optimizer).
        self.last_load_s = {"verify_s": round(verified - started, 3), "read_s": round(done - verified, 3),
                            "prepare_s": round(prepared - verified, 3), "dcp_read_s": round(read - prepared, 3),
                            "apply_s": round(done - read, 3)}
        rank_file = path / "trainer" / f"rank_{self.rank:05d}.pt"
        if not rank_file.is_file():  # resuming on more ranks than saved: rank 0's loader state is global
            rank_file = path / "trainer" / "rank_00000.pt"
        rank_state = torch.load(rank_file, weights_only=True)
        if meta["world_size"] != self.world_size:
            rank_state.pop("rng", None)  # RNG streams do not map across world sizes; the trainer reseeds
        return meta, rank_state


def write_model_only_checkpoint(model, path: Path, meta: dict) -> Path:
    """A complete checkpoint holding weights only (e.g. imported from Hugging Face to seed a trunk), written
    in one process. Resuming from it needs --reset-optimizer, on purpose."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with _one_process():
        dcp.save({"model": model.state_dict()}, storage_writer=HashingWriter(tmp), no_dist=True)
    (tmp / "trainer").mkdir()
    torch.save({}, tmp / "trainer" / "rank_00000.pt")
    meta = {**meta, "version": CHECKPOINT_VERSION, "world_size": 1, "has_optimizer": False, "milestone": False}
    checkpointer = Checkpointer(path.parent, rank=0, world_size=1, keep_last=10**9, async_save=False)
    checkpointer._finalize(tmp, path, meta)
    return path


def archive_weights(checkpoint: Path, target: Path, threads: int = 8) -> Path:
    """Write the weights of complete `checkpoint` as a bf16 weights-only checkpoint at `target` (one process,
    from the files on disk, so every rank's shards are included): about a sixth of the full checkpoint for
    genesis-1b (no optimizer state, half the bytes per weight). Its marker is written last, as for any
    checkpoint; an existing complete archive is left as it is (archives are never rewritten)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    target = Path(target)
    if is_complete(target):
        return target
    metadata = read_metadata_safely(Path(checkpoint) / ".metadata")
    weights = {key.removeprefix("model."): torch.empty(tuple(entry.size), dtype=entry.properties.dtype)
               for key, entry in metadata.state_dict_metadata.items()
               if key.startswith("model.") and isinstance(entry, TensorStorageMetadata)}
    with _one_process():
        dcp.load({"model": weights}, storage_reader=SafeReader(str(checkpoint), threads), planner=SafeLoadPlanner(),
                 no_dist=True)
    bf16 = {key: value.to(torch.bfloat16) if value.is_floating_point() else value for key, value in weights.items()}
    tmp = target.with_name(f".tmp-{target.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with _one_process():
        dcp.save({"model": bf16}, storage_writer=HashingWriter(tmp, threads), no_dist=True)
    (tmp / "trainer").mkdir()
    torch.save({}, tmp / "trainer" / "rank_00000.pt")
    meta = {**read_meta(checkpoint), "world_size": 1, "has_optimizer": False, "milestone": False,
            "archive_of": str(Path(checkpoint).resolve()), "weights_dtype": "bfloat16"}
    Checkpointer(target.parent, rank=0, world_size=1, keep_last=10**9, async_save=False)._finalize(tmp, target, meta)
    return target


def load_model_weights(path: Path, model, verify: bool = True) -> dict:
    """Load only the model weights of a checkpoint into an unsharded model, in one process, no process group
    (for export, generation, serving and branches). `verify`: check every file against the marker first (a
    flipped byte must never reach an output); callers that skip it say so to the user."""
    path = Path(path)
    meta = read_meta(path)
    if verify:
        verify_checkpoint(path)
    read_metadata_safely(path / ".metadata")  # a refusal in one line, before DCP (which wraps it in tracebacks)
    state = {"model": model.state_dict()}
    try:
        with _one_process():
            dcp.load(state, storage_reader=SafeReader(str(path)), planner=SafeLoadPlanner(), no_dist=True)
    except CheckpointException as err:
        # NOTE: DCP's CheckpointException derives from BaseException; turn it into a one-line error here so
        # callers (the CLI, the serve page) need not catch BaseException.
        reason = next((line for line in reversed(str(err).splitlines()) if line.strip()), "unreadable")
        raise CheckpointError(f"{path}: weights could not be read ({reason[:160]}); the checkpoint is damaged, "
                              f"use another (genesis verifies checksums on resume)") from None
    model.load_state_dict(state["model"])
    return meta
