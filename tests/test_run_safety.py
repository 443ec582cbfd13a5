"""Runs that never lose work and never leave half a start behind (issue #23, items 1, 2 and 4), on CPU with the
real trainer under torchrun."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import psutil
import pytest

from genesis.run_dir import MARKER, RunDir, list_checkpoints
from genesis_model.launch import trainer_command
from tests.conftest import FAST_OVERRIDES, REPO, TINY_CPU, read_jsonl, run_trainer

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr[-4000:]


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_sigkill_of_the_launchers_process_group_ends_every_rank_and_frees_the_run(token_data, tmp_path):
    run_dir = tmp_path / "run"
    command = trainer_command(TINY_CPU, [f"data_dir={token_data}", f"run_dir={run_dir}", *FAST_OVERRIDES,
                                         "max_steps=100000", "checkpoint.save_every=0", "checkpoint.save_at_end=false"],
                              nproc=2)
    launcher = subprocess.Popen(command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not (RunDir(run_dir).metrics.is_file()
                                              and read_jsonl(RunDir(run_dir).metrics)):
            assert launcher.poll() is None, "the trainer ended before it was killed"
            time.sleep(0.5)
        ranks = [child.pid for child in psutil.Process(launcher.pid).children(recursive=True)]
        assert len(ranks) >= 2, "both ranks should be training by now"
        assert RunDir(run_dir).train_lock().is_held_elsewhere()

        os.killpg(launcher.pid, signal.SIGKILL)  # what a scheduler, an OOM killer or a SIGKILL fallback does
        launcher.wait(timeout=10)
        # NOTE: a rank's main thread shows as a zombie while its other threads still exit; the run is free once
        # the last of them is gone and the kernel has dropped the lock, so wait for both.
        deadline = time.time() + 30
        while time.time() < deadline and (any(alive(pid) for pid in ranks)
                                          or RunDir(run_dir).train_lock().is_held_elsewhere()):
            time.sleep(0.2)
        assert not [pid for pid in ranks if alive(pid)], "a rank outlived its launcher"
        assert not RunDir(run_dir).train_lock().is_held_elsewhere(), "the run is still locked"
    finally:  # whatever the outcome, nothing of this run trains on after the test
        leftovers = [p.pid for p in psutil.process_iter(["cmdline"]) if str(run_dir) in " ".join(p.info["cmdline"] or [])]
        for pid in [launcher.pid, *leftovers]:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def test_resume_naming_an_unmarked_milestone_is_refused_and_the_milestone_is_kept(token_data, tmp_path):
    assert_ok(run_trainer(tmp_path, token_data, ["max_steps=4", "checkpoint.save_every=0",
                                                 "checkpoint.milestone_every=4"], nproc=1))
    milestone = tmp_path / "milestones" / "step_00000004"
    files = sorted(p.relative_to(milestone) for p in milestone.rglob("*") if p.name != MARKER)
    (milestone / MARKER).unlink()  # as if the disk filled up just before the marker

    refused = run_trainer(tmp_path, token_data, ["max_steps=8"], ["--resume", str(milestone)], nproc=1)
    assert refused.returncode != 0
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert errors and "incomplete" in errors[0] and str(milestone) in errors[0], refused.stderr[-2000:]
    assert sorted(p.relative_to(milestone) for p in milestone.rglob("*")) == files

    # Nor does a later start's clean-up remove it: milestones are never removed.
    assert_ok(run_trainer(tmp_path, token_data, ["max_steps=2", "checkpoint.save_every=0",
                                                 "checkpoint.milestone_every=0"], nproc=1))
    assert sorted(p.relative_to(milestone) for p in milestone.rglob("*")) == files


def test_a_start_refused_by_its_checks_writes_nothing(token_data, tmp_path):
    run = RunDir(tmp_path / "run")
    assert_ok(run_trainer(run.root, token_data, ["max_steps=2", "checkpoint.save_every=2"], nproc=1))
    before = {path: path.read_bytes() for path in (run.config, run.metrics, run.events, run.latest)}

    other_shape = run_trainer(run.root, token_data, ["max_steps=4", "model.n_layers=3"], ["--resume", "auto"],
                              nproc=1)
    assert other_shape.returncode != 0 and "model shapes differ" in other_shape.stderr
    assert {path: path.read_bytes() for path in before} == before
    assert [ref.step for ref in list_checkpoints(run.root)] == [2]

    fresh = tmp_path / "fresh"
    bad_data = tmp_path / "bad_data"
    bad_data.mkdir()
    (bad_data / "manifest.json").write_text("{not json")
    refused = run_trainer(fresh, bad_data, ["max_steps=2"], nproc=2)
    assert refused.returncode != 0 and "manifest.json" in refused.stderr
    assert not fresh.exists()
