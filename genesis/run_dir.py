"""The run directory and the branch directory: what lies where, written down once.

    <run_dir>/                      RunDir: one pretraining trunk
      config.yaml                   the resolved config of the last start
      train.lock                    held by the trainer for its lifetime (DirLock)
      latest.json                   the current state, rewritten atomically every step
      metrics.jsonl                 one line per logged step (MetricsReader)
      loss.png                      the run's curves, drawn when a trunk cycle ends
      events.jsonl                  skipped steps, spikes, checkpoints, resumes, resets
      checkpoints/step_N/           rolling checkpoints (keep-last-K)
      milestones/step_N/            immutable milestones
      hf/step_N/                    a milestone exported once as a Hugging Face directory (fp32): the
                                    registered genesis-base version and the model every branch starts from
      registry.lock                 serialises exporting and registering a milestone (trunk follower, branches)
      branches/step_N/              BranchDir: the branch grown off milestones/step_N

    <branch_dir>/                   BranchDir
      branch.lock                   held while the branch grows
      data/                         sft.jsonl, dpo_train.jsonl, dpo_heldout.jsonl, heldout_prompts.jsonl, report.json
      branch.json                   what grew from what (milestone, base model, config, data digests); written
                                    last by the data stage, so its presence means the data is complete
      sft/, dpo/                    Hugging Face directories, complete once their genesis_stage.json exists
      eval.json                     written last: a branch with eval.json is complete

A checkpoint directory is complete only once its COMPLETE.json (every file with size and sha256) exists.
Nothing here imports torch: listing checkpoints, reading metrics and taking locks work on any machine.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from genesis.errors import CheckpointError, RunDirError

# Run directory
CONFIG = "config.yaml"
TRAIN_LOCK = "train.lock"
LATEST = "latest.json"
METRICS = "metrics.jsonl"
CURVES = "loss.png"
EVENTS = "events.jsonl"
ROLLING_DIR, MILESTONE_DIR = "checkpoints", "milestones"
ARCHIVE_DIR = "archive"  # weights-only bf16 copies of every checkpoint (`checkpoint.archive_weights`), kept forever
HF_DIR = "hf"
BRANCHES_DIR = "branches"
REGISTRY_LOCK = "registry.lock"

# Checkpoint directory
MARKER = "COMPLETE.json"
META = "meta.json"

# Branch directory
BRANCH_LOCK = "branch.lock"
BRANCH_RECORD = "branch.json"
EVAL = "eval.json"
# Inside every model directory a stage wrote (sft/, dpo/): the stage, its parent, the system prompt it was
# tuned with. Written last, so its presence means the directory is complete.
STAGE_MARKER = "genesis_stage.json"
TRAIN_LOG = "train_log.json"  # beside it: the trainer's log history, one row per logging step
# Inside every exported milestone (hf/step_N): which checkpoint it came from; written last by the export.
EXPORT_MARKER = "genesis.json"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def step_of(name: str) -> int:
    return int(name.removeprefix("step_"))


def write_json_atomic(path: Path, data) -> None:
    """Write JSON under a temporary name and rename it into place: a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str, ensure_ascii=False))
    os.replace(tmp, path)


# -------------------------------------------------------------------------------------------------------------
# The one lock


class DirLock:
    """An exclusive flock on a lock file, released by the kernel when the holder dies (even by SIGKILL), so a
    crashed process never leaves a stale lock. The file names its holder for the refusal message."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.handle = None

    def acquire(self, wait: bool = False) -> None:
        """Take the lock; with `wait`, block until it is free, else refuse at once with one line."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            other = "another run_dir" if self.path.name == TRAIN_LOCK else "another directory"
            raise RunDirError(f"{self.path.parent}: directory is locked by {holder} ({self.path.name}); stop that "
                              f"process or use {other}") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        handle.flush()
        self.handle = handle

    def release(self) -> None:
        if self.handle:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None

    def is_held_elsewhere(self) -> bool:
        """True when another process holds the lock right now (probes without keeping it)."""
        if not self.path.exists():
            return False
        try:
            self.acquire()
        except RunDirError:
            return True
        self.release()
        return False

    @contextmanager
    def held(self, wait: bool = False) -> Iterator[DirLock]:
        self.acquire(wait=wait)
        try:
            yield self
        finally:
            self.release()


# -------------------------------------------------------------------------------------------------------------
# Checkpoints, without torch


@dataclass(frozen=True)
class CheckpointRef:
    path: Path
    step: int
    milestone: bool


def is_complete(path: Path) -> bool:
    return (Path(path) / MARKER).is_file()


def read_meta(path: Path) -> dict:
    """A complete checkpoint's meta.json; one-line CheckpointError for a missing or interrupted one."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory does not exist; pass a run's checkpoints/step_N or "
                              f"milestones/step_N dir")
    if not is_complete(path):
        raise CheckpointError(f"{path}: checkpoint is incomplete (no {MARKER}); it was interrupted while saving")
    return json.loads((path / META).read_text())


def list_checkpoints(run_dir: Path) -> list[CheckpointRef]:
    """Complete checkpoints of a run, rolling and milestones, oldest first."""
    refs = []
    for sub, milestone in ((ROLLING_DIR, False), (MILESTONE_DIR, True)):
        for path in sorted((Path(run_dir) / sub).glob("step_*")):
            if path.is_dir() and is_complete(path):
                refs.append(CheckpointRef(path, step_of(path.name), milestone))
    return sorted(refs, key=lambda ref: (ref.step, ref.milestone))


def list_archives(run_dir: Path) -> list[Path]:
    """Complete weights-only archives of a run, oldest first."""
    return [path for path in sorted((Path(run_dir) / ARCHIVE_DIR).glob("step_*")) if path.is_dir() and is_complete(path)]


def is_cooled_off_trunk(ref: CheckpointRef) -> bool:
    """A milestone cooled down off the trunk (optimizer.cooldown=fork; its meta names the fork): a model to
    branch from, not the trunk's state. Resuming the trunk there would grow it from decayed weights."""
    if not ref.milestone:
        return False
    try:
        return "cooldown" in json.loads((ref.path / META).read_text())
    except (OSError, ValueError):
        return False


def latest_checkpoint(run_dir: Path) -> CheckpointRef | None:
    """The newest complete checkpoint the trunk continues from (`--resume auto`, a rollback): milestones cooled
    off the trunk are not the trunk's state and are skipped."""
    refs = [ref for ref in list_checkpoints(run_dir) if not is_cooled_off_trunk(ref)]
    return refs[-1] if refs else None


# -------------------------------------------------------------------------------------------------------------
# metrics.jsonl, the one reader

COOLDOWN_PREFIX = "cooldown/"


def is_cooldown_row(row: dict) -> bool:
    """A row of a milestone's cool-down off the trunk (`cooldown/...` metrics, optimizer.cooldown=fork): logged
    at steps the trunk reaches only later, so it is not a point of the trunk's own history."""
    return any(key.startswith(COOLDOWN_PREFIX) for key in row)


class MetricsReader:
    """Reads metrics.jsonl incrementally: each `read_new()` parses only the bytes appended since the last call.

    A line still being written (no newline yet) waits for the next call; a line that is not a JSON object with
    an integer `step` is skipped. A file replaced or truncated (a new run in the same directory) starts over,
    and `read_new` says so."""

    def __init__(self, path: Path, from_end: bool = False):
        self.path = Path(path)
        self.offset = self.path.stat().st_size if from_end and self.path.is_file() else 0
        self._inode: int | None = None

    def read_new(self) -> tuple[list[dict], bool]:
        """(rows appended since the last call, whether the file was replaced since then)."""
        try:
            stat = self.path.stat()
        except OSError:
            return [], False
        replaced = (self._inode is not None and stat.st_ino != self._inode) or stat.st_size < self.offset
        if replaced:
            self.offset = 0
        self._inode = stat.st_ino
        if stat.st_size == self.offset:
            return [], replaced
        with open(self.path, "rb") as handle:
            handle.seek(self.offset)
            chunk = handle.read(stat.st_size - self.offset)
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self.offset += len(complete)
        rows = []
        for line in complete.splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                rows.append(row)
        return rows, replaced

    def all_rows(self) -> list[dict]:
        """Every row from the start of the file (a fresh read)."""
        self.offset, self._inode = 0, None
        return self.read_new()[0]


# -------------------------------------------------------------------------------------------------------------
# The directories


@dataclass(frozen=True)
class RunDir:
    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))  # a str from a flow parameter or a task's result

    @classmethod
    def of_checkpoint(cls, checkpoint: Path) -> RunDir:
        """The run a checkpoint or milestone directory belongs to (<run_dir>/{checkpoints,milestones}/step_N)."""
        return cls(Path(checkpoint).resolve().parent.parent)

    @property
    def config(self) -> Path:
        return self.root / CONFIG

    @property
    def latest(self) -> Path:
        return self.root / LATEST

    @property
    def metrics(self) -> Path:
        return self.root / METRICS

    @property
    def events(self) -> Path:
        return self.root / EVENTS

    @property
    def curves(self) -> Path:
        return self.root / CURVES

    @property
    def rolling_dir(self) -> Path:
        return self.root / ROLLING_DIR

    @property
    def milestones_dir(self) -> Path:
        return self.root / MILESTONE_DIR

    @property
    def archive_dir(self) -> Path:
        return self.root / ARCHIVE_DIR

    def train_lock(self) -> DirLock:
        return DirLock(self.root / TRAIN_LOCK)

    def registry_lock(self) -> DirLock:
        return DirLock(self.root / REGISTRY_LOCK)

    def checkpoints(self) -> list[CheckpointRef]:
        return list_checkpoints(self.root)

    def milestones(self) -> list[Path]:
        """Complete milestones, oldest first."""
        return [ref.path for ref in self.checkpoints() if ref.milestone]

    def hf_export(self, milestone: Path) -> Path:
        """Where milestone `milestones/step_N` is exported as a Hugging Face directory."""
        return self.root / HF_DIR / Path(milestone).name

    def branch(self, milestone: Path) -> BranchDir:
        """The default branch directory of milestone `milestones/step_N`: `branches/step_N`."""
        return BranchDir(self.root / BRANCHES_DIR / Path(milestone).name)

    def branches(self) -> list[BranchDir]:
        return [BranchDir(path) for path in sorted((self.root / BRANCHES_DIR).glob("step_*")) if path.is_dir()]

    def milestones_to_branch(self) -> list[Path]:
        """Complete milestones whose default branch is neither complete nor being grown right now."""
        return [milestone for milestone in self.milestones()
                if not self.branch(milestone).complete and not self.branch(milestone).growing]

    def read_latest(self) -> dict:
        """latest.json, or {} before the trainer wrote one (or while it is unreadable)."""
        try:
            data = json.loads(self.latest.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}


def is_exported(model_dir: Path) -> bool:
    return (Path(model_dir) / EXPORT_MARKER).is_file()


def stage_complete(model_dir: Path) -> bool:
    """A stage's model directory (sft/, dpo/) is complete once its stage marker exists."""
    return (Path(model_dir) / STAGE_MARKER).is_file()


def read_stage(model_dir: Path) -> dict:
    """The stage marker of a model directory a stage wrote; {} for any other directory."""
    marker = Path(model_dir) / STAGE_MARKER
    return json.loads(marker.read_text()) if marker.is_file() else {}


@dataclass(frozen=True)
class BranchDir:
    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def report(self) -> Path:
        return self.data_dir / "report.json"

    def data_file(self, name: str) -> Path:
        """sft, dpo_train, dpo_heldout or heldout_prompts."""
        return self.data_dir / f"{name}.jsonl"

    def read_data(self, name: str) -> list:
        """The rows of one data file (see `data_file`)."""
        return [json.loads(line) for line in self.data_file(name).read_text(encoding="utf-8").splitlines() if line]

    @property
    def record(self) -> Path:
        return self.root / BRANCH_RECORD

    @property
    def sft_dir(self) -> Path:
        return self.root / "sft"

    @property
    def dpo_dir(self) -> Path:
        return self.root / "dpo"

    @property
    def eval_path(self) -> Path:
        return self.root / EVAL

    def lock(self) -> DirLock:
        return DirLock(self.root / BRANCH_LOCK)

    @property
    def growing(self) -> bool:
        """Another process holds the branch's lock right now."""
        return self.root.is_dir() and self.lock().is_held_elsewhere()

    @property
    def has_data(self) -> bool:
        return self.record.is_file()

    @property
    def complete(self) -> bool:
        return self.eval_path.is_file()

    @property
    def step(self) -> int | None:
        return step_of(self.root.name) if self.root.name.startswith("step_") else None

    def read_record(self) -> dict:
        return json.loads(self.record.read_text()) if self.record.is_file() else {}

    def read_eval(self) -> dict:
        return json.loads(self.eval_path.read_text())
