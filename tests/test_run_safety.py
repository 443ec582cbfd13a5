"""Runs that never lose work and never leave half a start behind (issue #23, items 1, 2 and 4), on CPU with the
real trainer under torchrun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import psutil
import pytest

from genesis.run_dir import MARKER, MetricsReader, RunDir, list_checkpoints
from genesis_model.launch import trainer_command
from tests.conftest import FAST_OVERRIDES, REPO, TINY_CPU, alive, assert_ok, read_jsonl, run_trainer

pytestmark = [pytest.mark.slow, pytest.mark.integration]


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

    # A start without --resume into a directory holding a run (another config here) would restart it at step 0
    # over its checkpoints and config.yaml: refused in one line (#26: the README's first run wrote into the demo's).
    restart = run_trainer(run.root, token_data, ["max_steps=4", "seed=7"], nproc=1)
    errors = [line for line in restart.stderr.splitlines() if line.startswith("error:")]
    assert restart.returncode != 0 and len(errors) == 1, restart.stderr[-2000:]
    assert "already holds a run" in errors[0] and "--resume auto" in errors[0] and "step 2" in errors[0]
    assert {path: path.read_bytes() for path in before} == before
    assert [ref.step for ref in list_checkpoints(run.root)] == [2]

    fresh = tmp_path / "fresh"
    bad_data = tmp_path / "bad_data"
    bad_data.mkdir()
    (bad_data / "manifest.json").write_text("{not json")
    refused = run_trainer(fresh, bad_data, ["max_steps=2"], nproc=2)
    assert refused.returncode != 0 and "manifest.json" in refused.stderr
    assert not fresh.exists()


# ---------------------------------------------------------------------------------------------------------------
# Item 5: no checkpoint of unsound weights; spikes skipped or rolled back


def weights_loss(checkpoint, data_dir) -> float:
    """The loss of a checkpoint's weights on the first documents of the data: what a resume would start from."""
    import torch

    from genesis.config import ModelConfig
    from genesis.manifest import ShardReader, read_manifest
    from genesis.run_dir import read_meta
    from genesis_model.checkpoint import load_model_weights
    from genesis_model.model import Transformer

    model = Transformer(ModelConfig.model_validate(read_meta(checkpoint)["model_config"]))
    load_model_weights(checkpoint, model)
    shard = read_manifest(data_dir).sources[0].shards[0]
    tokens = torch.from_numpy(ShardReader(data_dir / shard.path).doc(0)[:65].astype("int64"))[None]
    with torch.no_grad():
        return float(model.eval()(tokens[:, :-1], tokens[:, 1:]))


def test_a_destructive_update_is_never_checkpointed_and_resume_auto_finds_sound_weights(token_data, tmp_path):
    """`optimizer.lr=1e6` from step 6 on: the update is finite, the weights it leaves are not. Every later save
    is withheld (the weights' loss on the next batch gives them away before the non-finite streak does), so the
    newest checkpoint stays the sound one of step 6. On the previous code, steps 7+ were saved destroyed."""
    import math

    assert_ok(run_trainer(tmp_path, token_data, ["max_steps=6", "checkpoint.save_every=3"], nproc=1))
    wrecked = run_trainer(tmp_path, token_data, ["max_steps=20", "checkpoint.save_every=1", "optimizer.lr=1e6",
                                                 "optimizer.min_lr=0"], ["--resume", "auto"], nproc=1)
    assert wrecked.returncode != 0 and "non-finite steps in a row" in wrecked.stderr, wrecked.stderr[-2000:]
    events = read_jsonl(RunDir(tmp_path).events)
    withheld = [e for e in events if e["event"] == "checkpoint_withheld"]
    assert withheld and withheld[0]["step"] == 7, [e["event"] for e in events]
    assert [ref.step for ref in list_checkpoints(tmp_path)] == [3, 6]
    assert math.isfinite(weights_loss(tmp_path / "checkpoints" / "step_00000006", token_data))
    latest = json.loads(RunDir(tmp_path).latest.read_text())
    assert latest["health"]["checkpoints_withheld"] >= 1 and not latest["health"]["healthy"]


def test_a_loss_spike_is_skipped_by_default_and_rolled_back_on_request(token_data, tmp_path):
    """A finite loss spike (x100 at step 12, after a window of 5 losses): by default the update is skipped and
    counted; with `spike_policy=rollback` the newest checkpoint (step 8) is reloaded and training goes on after
    the spike's data, to the target step."""
    spike = {"GENESIS_INJECT_SPIKE_STEPS": "12"}
    common = ["max_steps=16", "checkpoint.save_every=4", "stability.spike_window=5"]

    skipped_dir = tmp_path / "skip"
    assert_ok(run_trainer(skipped_dir, token_data, common, nproc=1, env=spike))
    spikes = [e for e in read_jsonl(RunDir(skipped_dir).events) if e["event"] == "loss_spike"]
    assert [(e["step"], e["action"]) for e in spikes] == [(12, "update_skipped")]
    latest = json.loads(RunDir(skipped_dir).latest.read_text())
    assert latest["status"] == "completed" and latest["health"]["spikes_skipped"] == 1

    rolled_dir = tmp_path / "rollback"
    assert_ok(run_trainer(rolled_dir, token_data, [*common, "stability.spike_policy=rollback"], nproc=1, env=spike))
    events = read_jsonl(RunDir(rolled_dir).events)
    rollbacks = [e for e in events if e["event"] == "rolled_back"]
    assert [(e["from_step"], e["to_step"], e["reason"]) for e in rollbacks] == [(12, 8, "loss_spike")]
    assert rollbacks[0]["tokens_skipped"] > 0
    latest = json.loads(RunDir(rolled_dir).latest.read_text())
    assert latest["status"] == "completed" and latest["step"] == 16 and latest["health"]["rollbacks"] == 1
    metrics = MetricsReader(RunDir(rolled_dir).metrics).all_rows()
    assert max(row["rollbacks"] for row in metrics) == 1  # in the metrics that MLflow and `genesis serve` read
