"""Checkpoint files are trusted only once checked (issue #23, items 6 and 7): every load verifies the digests the
writers recorded, and checkpoint metadata is never unpickled into anything but DCP's own metadata classes.

The checkpoints are made by the real trainer (one CPU rank); the loads go through the real command line."""

from __future__ import annotations

import hashlib
import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from genesis.errors import CheckpointError
from genesis.run_dir import MARKER
from genesis_model.checkpoint import has_optimizer_state, verify_checkpoint
from genesis_model.checkpoint_io import DIGEST, digests_for_marker, file_digest
from genesis_model.inference import load_checkpoint
from tests.conftest import FAST_OVERRIDES, REPO, TINY_CPU, run_trainer

pytestmark = [pytest.mark.slow, pytest.mark.integration]

GENESIS = [sys.executable, "-m", "cli.main"]


def genesis(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*GENESIS, *map(str, args)], capture_output=True, text=True, timeout=300, cwd=REPO)


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def checkpoint(token_data, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("run")
    result = run_trainer(run_dir, token_data, ["max_steps=2", "checkpoint.save_every=2"], nproc=1)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir / "checkpoints" / "step_00000002"


def copy_of(checkpoint: Path, tmp_path: Path) -> Path:
    """A copy kept inside a run-like layout, so the copy finds the run's data (and tokenizer) as the original."""
    import shutil

    target = tmp_path / "copy" / "checkpoints" / checkpoint.name
    shutil.copytree(checkpoint, target)
    return target


def test_the_marker_lists_every_file_with_the_digest_its_writer_recorded(checkpoint):
    marker = json.loads((checkpoint / MARKER).read_text())
    on_disk = sorted(str(p.relative_to(checkpoint)) for p in checkpoint.rglob("*") if p.is_file() and p.name != MARKER)
    assert sorted(marker["files"]) == on_disk
    for name, entry in marker["files"].items():
        assert entry[DIGEST] == file_digest(checkpoint / name), name
    # The shard files' digests were taken as the bytes were written (hashes/), not by reading them back.
    recorded = json.loads((checkpoint / "hashes" / "__0.json").read_text())
    assert recorded and all(name.endswith(".distcp") for name in recorded)
    assert all(marker["files"][name] == entry for name, entry in recorded.items())


def test_a_marker_written_with_sha256_still_verifies_and_still_catches_damage(checkpoint, tmp_path):
    old = copy_of(checkpoint, tmp_path)
    files = {name: {"bytes": entry["bytes"], "sha256": hashlib.sha256((old / name).read_bytes()).hexdigest()}
             for name, entry in digests_for_marker(old).items() if name != MARKER}
    (old / MARKER).write_text(json.dumps({"step": 2, "files": files, "completed": 0}))
    verify_checkpoint(old)
    shard = next(old.glob("*.distcp"))
    flip_byte(shard)
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        verify_checkpoint(old)


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_one_flipped_byte_in_a_shard_file_is_refused_by_generate_export_and_every_model_load(checkpoint, tmp_path):
    damaged = copy_of(checkpoint, tmp_path)
    flip_byte(max(damaged.glob("*.distcp"), key=lambda p: p.stat().st_size))

    out = tmp_path / "hf"
    exported = genesis("export-hf", damaged, out)
    assert exported.returncode != 0 and not out.exists()
    assert len(error_lines(exported)) == 1 and "checksum mismatch" in error_lines(exported)[0], exported.stderr

    generated = genesis("generate", "--checkpoint", damaged, "--prompt", "hello", "--max-new-tokens", "4")
    assert generated.returncode != 0 and generated.stdout == ""
    assert len(error_lines(generated)) == 1 and "checksum mismatch" in error_lines(generated)[0], generated.stderr

    # `genesis serve` and the branches load checkpoints through this same function.
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_checkpoint(damaged)


class _Payload:
    """What a crafted checkpoint would carry: unpickling it runs a command."""

    def __init__(self, proof: Path):
        self.proof = proof

    def __reduce__(self):
        return (Path.touch, (self.proof,))


def crafted_checkpoint(checkpoint: Path, tmp_path: Path, proof: Path) -> Path:
    """A checkpoint directory whose `.metadata` runs code when unpickled, with a marker that matches it (whoever
    crafts a directory writes its marker too)."""
    crafted = copy_of(checkpoint, tmp_path)
    (crafted / ".metadata").write_bytes(pickle.dumps(_Payload(proof)))
    files = {name: entry for name, entry in digests_for_marker(crafted).items() if name != MARKER}
    (crafted / MARKER).write_text(json.dumps({"step": 2, "files": files, "completed": 0}))
    return crafted


def resume_in_one_process(checkpoint: Path, data_dir: Path, run_dir: Path) -> subprocess.CompletedProcess:
    """`python -m genesis_model.train` without torchrun: the trainer's own output, nothing of a launcher's."""
    return subprocess.run([sys.executable, "-m", "genesis_model.train", "--config", str(TINY_CPU),
                           f"data_dir={data_dir}", f"run_dir={run_dir}", *FAST_OVERRIDES, "max_steps=4",
                           "--resume", str(checkpoint)], capture_output=True, text=True, timeout=300, cwd=REPO)


def test_crafted_checkpoint_metadata_is_refused_in_one_line_and_runs_nothing(checkpoint, token_data, tmp_path):
    proof = tmp_path / "code-ran"
    crafted = crafted_checkpoint(checkpoint, tmp_path, proof)

    for result in (genesis("export-hf", crafted, tmp_path / "hf"),
                   genesis("generate", "--checkpoint", crafted, "--prompt", "hi", "--max-new-tokens", "2"),
                   resume_in_one_process(crafted, token_data, tmp_path / "resumed")):
        assert result.returncode != 0
        errors = error_lines(result)
        assert len(errors) == 1 and "refusing to load" in errors[0] and "Traceback" not in result.stderr, result.stderr
        assert not proof.exists(), "the crafted metadata ran code"


def test_real_metadata_reads_through_the_allow_list(checkpoint):
    assert has_optimizer_state(checkpoint)
    assert load_checkpoint(checkpoint).model is not None


def test_a_pickled_entry_inside_a_shard_file_that_would_run_code_is_refused(tmp_path):
    """Non-tensor entries (optimizer hyper-parameters) live as pickled bytes inside the shard files, which DCP's
    default planner reads with `weights_only=False`; here they are read as plain values only."""
    import io

    import torch
    from torch.distributed.checkpoint.metadata import MetadataIndex
    from torch.distributed.checkpoint.planner import LoadItemType, ReadItem

    from genesis_model.checkpoint_io import SafeLoadPlanner

    proof = tmp_path / "code-ran"
    planner = SafeLoadPlanner()
    planner.set_up_planner({"optimizer.lr": 0.0}, metadata=None, is_coordinator=True)
    item = ReadItem(type=LoadItemType.BYTE_IO, dest_index=MetadataIndex("optimizer.lr"), dest_offsets=torch.Size([0]),
                    storage_index=MetadataIndex("optimizer.lr"), storage_offsets=torch.Size([0]), lengths=torch.Size([0]))
    crafted = io.BytesIO()
    torch.save(_Payload(proof), crafted)
    crafted.seek(0)
    with pytest.raises(CheckpointError, match="refusing to load"):
        planner.load_bytes(item, crafted)
    assert not proof.exists()

    plain = io.BytesIO()
    torch.save({"betas": (0.9, 0.95), "lr": 3e-4, "fused": None}, plain)
    plain.seek(0)
    planner.load_bytes(item, plain)
    assert planner.original_state_dict["optimizer.lr"] == {"betas": (0.9, 0.95), "lr": 3e-4, "fused": None}


def test_archived_weights_are_bf16_copies_of_every_checkpoint_kept_forever_and_loadable(token_data, tmp_path):
    """`checkpoint.archive_weights`: each save also leaves a weights-only bf16 checkpoint in archive/, built from
    both ranks' shards; keep_last prunes the rolling checkpoints, never the archive; generate, export and the
    try-it page load an archive like any checkpoint (verified first)."""
    import torch

    from genesis.run_dir import list_archives
    from serve.run_view import RunView

    run_dir = tmp_path / "run"
    result = run_trainer(run_dir, token_data, ["max_steps=4", "checkpoint.save_every=2", "checkpoint.keep_last=1",
                                               "checkpoint.async_save=true", "checkpoint.archive_weights=true"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert [p.name for p in (run_dir / "checkpoints").glob("step_*")] == ["step_00000004"]
    archives = list_archives(run_dir)
    assert [p.name for p in archives] == ["step_00000002", "step_00000004"]
    for archive in archives:
        verify_checkpoint(archive)

    full = load_checkpoint(run_dir / "checkpoints" / "step_00000004").model.state_dict()
    archived = load_checkpoint(archives[-1]).model.state_dict()
    assert full.keys() == archived.keys()
    for key in full:
        assert torch.equal(archived[key], full[key].to(torch.bfloat16).float()), key
    size = lambda path: sum(p.stat().st_size for p in path.rglob("*.distcp"))  # noqa: E731
    assert size(archives[-1]) < size(run_dir / "checkpoints" / "step_00000004") / 4  # no optimizer, half the bytes

    entries = {entry.id: entry for entry in RunView(run_dir).models()}
    assert {"archive/step_00000002", "archive/step_00000004"} <= entries.keys()
