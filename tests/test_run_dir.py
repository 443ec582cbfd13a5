"""The run-directory contract (genesis/run_dir.py): one lock, one metrics reader, checkpoints listed without torch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from genesis.errors import CheckpointError, RunDirError
from genesis.run_dir import (MARKER, META, BranchDir, DirLock, MetricsReader, RunDir, latest_checkpoint,
                             list_checkpoints, read_meta, step_dir_name)
from tests.conftest import REPO


def test_a_locked_directory_is_refused_with_one_line_naming_the_holder(tmp_path):
    holder = RunDir(tmp_path).train_lock()
    holder.acquire()
    try:
        with pytest.raises(RunDirError) as refused:
            RunDir(tmp_path).train_lock().acquire()
        message = str(refused.value)
        assert "\n" not in message and f"pid {os.getpid()}" in message and "another run_dir" in message
    finally:
        holder.release()
    RunDir(tmp_path).train_lock().acquire()  # free again once released


def test_a_lock_dies_with_its_holder_even_by_sigkill(tmp_path):
    lock_path = tmp_path / "branch.lock"
    code = ("import sys, time; from genesis.run_dir import DirLock; lock = DirLock(sys.argv[1]); lock.acquire(); "
            "print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(lock_path)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert DirLock(lock_path).is_held_elsewhere()
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
        assert not DirLock(lock_path).is_held_elsewhere()
    finally:
        holder.kill()


def test_a_waiting_lock_is_taken_as_soon_as_the_holder_lets_go(tmp_path):
    first = RunDir(tmp_path).registry_lock()
    first.acquire()
    taken_at = []

    def wait_for_it():
        with RunDir(tmp_path).registry_lock().held(wait=True):
            taken_at.append(time.monotonic())

    waiter = threading.Thread(target=wait_for_it)
    waiter.start()
    time.sleep(0.3)
    assert not taken_at, "the second holder must wait"
    released_at = time.monotonic()
    first.release()
    waiter.join(timeout=5)
    assert taken_at and taken_at[0] >= released_at


def test_the_metrics_reader_returns_only_complete_new_rows(tmp_path):
    path = tmp_path / "metrics.jsonl"
    reader = MetricsReader(path)
    assert reader.read_new() == ([], False)  # no file yet
    path.write_text(json.dumps({"step": 1, "loss": 5.0}) + "\n" + '{"step": 2, "lo')
    assert reader.read_new() == ([{"step": 1, "loss": 5.0}], False)  # the half-written line waits
    with open(path, "a") as handle:
        handle.write('ss": 4.0}\nnot json\n{"no_step": 1}\n')
    assert reader.read_new() == ([{"step": 2, "loss": 4.0}], False)
    assert reader.read_new() == ([], False)


def test_the_metrics_reader_starts_over_when_the_file_is_replaced(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1, "loss": 5.0}) + "\n" + json.dumps({"step": 2, "loss": 4.0}) + "\n")
    reader = MetricsReader(path)
    assert len(reader.read_new()[0]) == 2
    replacement = tmp_path / "new.jsonl"
    replacement.write_text(json.dumps({"step": 1, "loss": 6.0}) + "\n")
    os.replace(replacement, path)
    assert reader.read_new() == ([{"step": 1, "loss": 6.0}], True)


def test_a_follower_started_from_the_end_skips_what_was_logged_before(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1, "loss": 5.0}) + "\n")
    reader = MetricsReader(path, from_end=True)
    with open(path, "a") as handle:
        handle.write(json.dumps({"step": 2, "loss": 4.0}) + "\n")
    assert reader.read_new() == ([{"step": 2, "loss": 4.0}], False)
    assert [row["step"] for row in reader.all_rows()] == [1, 2]


def _checkpoint(parent, step: int, complete: bool = True):
    path = parent / step_dir_name(step)
    path.mkdir(parents=True)
    (path / META).write_text(json.dumps({"step": step}))
    if complete:
        (path / MARKER).write_text(json.dumps({"step": step, "files": {}}))
    return path


def test_only_complete_checkpoints_are_listed_and_the_newest_wins(tmp_path):
    run = RunDir(tmp_path)
    _checkpoint(run.rolling_dir, 100)
    _checkpoint(run.rolling_dir, 200, complete=False)  # an interrupted save
    milestone = _checkpoint(run.milestones_dir, 150)
    assert [(ref.step, ref.milestone) for ref in list_checkpoints(tmp_path)] == [(100, False), (150, True)]
    assert latest_checkpoint(tmp_path).path == milestone
    assert run.milestones() == [milestone]
    assert RunDir.of_checkpoint(milestone) == RunDir(tmp_path.resolve())
    assert run.hf_export(milestone) == tmp_path / "hf" / "step_00000150"
    assert run.branch(milestone) == BranchDir(tmp_path / "branches" / "step_00000150")
    assert read_meta(milestone) == {"step": 150}
    with pytest.raises(CheckpointError, match="incomplete"):
        read_meta(run.rolling_dir / step_dir_name(200))


def test_the_ground_floor_imports_neither_torch_nor_any_other_floor():
    code = ("import sys, genesis.config, genesis.errors, genesis.manifest, genesis.run_dir, genesis.chat, "
            "genesis.records, genesis.principles, genesis.principles.dialogues; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'genesis_model', 'data_prep', 'branch', "
            "'lineage', 'serve', 'tasks', 'flows', 'cli', 'prefect', 'mlflow'}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.stdout.strip() == "[]", result.stderr
