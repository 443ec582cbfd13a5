"""Specifications of the distributed trainer and its checkpoints, on CPU with 2 gloo ranks under torchrun.

The two incidents behind Genesis are reproduced here: a resume must be bit-exact (model AND optimizer), and a
checkpoint without optimizer state must be refused unless the user explicitly resets the optimizer.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import psutil
import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from genesis.run_dir import MARKER, RunDir, latest_checkpoint, list_checkpoints
from genesis_model.checkpoint import load_model_weights, verify_checkpoint, write_model_only_checkpoint
from genesis_model.launch import trainer_command
from genesis_model.model import Transformer
from genesis.config import TrainConfig, load_config, load_model_config
from tests.conftest import (FAST_OVERRIDES, REPO, TINY_CPU, alive, assert_ok, built_once, losses_by_step, read_jsonl,
                            run_trainer)

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def full_state(checkpoint: Path, tmp_path: Path) -> dict:
    out = tmp_path / f"{checkpoint.parent.parent.name}-{checkpoint.name}.pt"
    dcp_to_torch_save(str(checkpoint), str(out))
    return torch.load(out, weights_only=True)


def assert_same_tensors(a, b, path="") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{path} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            assert_same_tensors(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_tensors(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


@pytest.fixture(scope="session")
def uninterrupted(token_data, tmp_path_factory) -> Path:
    """The reference: 0 → 300 in one go on 2 ranks, saving at 150 and 300 (built once, however the tests that read
    it are spread over xdist's workers)."""
    return built_once(tmp_path_factory, "uninterrupted", lambda run_dir: assert_ok(
        run_trainer(run_dir, token_data, ["max_steps=300", "checkpoint.save_every=150"])))


def test_smoke_matrix_and_bit_exact_resume_after_process_exit(uninterrupted, token_data, tmp_path):
    # The reference run's smoke matrix: a 220-step run saving at 150 ...
    interrupted = tmp_path / "interrupted"
    assert_ok(run_trainer(interrupted, token_data, ["max_steps=300", "checkpoint.save_every=150"],
                          ["--stop-at-step", "220"]))
    assert [ref.step for ref in list_checkpoints(interrupted)] == [150, 220]
    # ... then, in a new process, resume 150 → 300 with a second save at 300.
    step_150 = interrupted / "checkpoints" / "step_00000150"
    assert_ok(run_trainer(interrupted, token_data, ["max_steps=300", "checkpoint.save_every=150"],
                          ["--resume", str(step_150)]))
    assert latest_checkpoint(interrupted).step == 300

    reference, resumed = losses_by_step(uninterrupted), losses_by_step(interrupted)
    assert len(reference) == 300
    for step in range(1, 301):
        assert resumed[step] == reference[step], f"loss differs at step {step}"
    # The training-only leg: the loss went down over 100+ steps.
    assert sum(reference[s] for s in range(281, 301)) < sum(reference[s] for s in range(1, 21))

    final_a = full_state(uninterrupted / "checkpoints" / "step_00000300", tmp_path)
    final_b = full_state(interrupted / "checkpoints" / "step_00000300", tmp_path)
    assert "optimizer" in final_a and final_a["optimizer"]["state"]
    assert_same_tensors(final_a, final_b)


def test_train_runs_in_process_from_a_typed_config_and_its_callbacks_state_survives_resume(token_data, tmp_path):
    from genesis_model.train import train

    def config(max_steps: int) -> TrainConfig:
        return load_config(TrainConfig, TINY_CPU, [f"data_dir={token_data}", f"run_dir={tmp_path}", *FAST_OVERRIDES,
                                                   f"max_steps={max_steps}", "checkpoint.save_every=0"])

    # NOTE: train() sets up a one-rank process group through the environment (RANK, MASTER_PORT, ...); restore
    # it, so trainers that later tests start under torchrun do not inherit it.
    with mock.patch.dict(os.environ):
        assert train(config(4), stop_at_step=3) == "paused"
        assert train(config(4), resume="auto") == "completed"
    # The spike detector's window (a callback's state) is saved per rank under its old key, and restored.
    state = torch.load(tmp_path / "checkpoints" / "step_00000004" / "trainer" / "rank_00000.pt", weights_only=True)
    assert set(state) == {"loader", "rng", "spikes"} and len(state["spikes"]["losses"]) == 4
    latest = json.loads((tmp_path / "latest.json").read_text())
    assert latest["status"] == "completed" and latest["step"] == 4
    assert latest["last_checkpoint"].endswith("step_00000004")
    meta = json.loads((tmp_path / "checkpoints" / "step_00000004" / "meta.json").read_text())
    assert meta["parallel_resolved"] == {"compile_scope": "model", "master_weights": False, "compile": False,
                                         "param_dtype": "float32", "float8": "off", "micro_steps": "plain"}
    assert meta["last_loss"] == losses_by_step(tmp_path)[4]
    assert [e["event"] for e in read_jsonl(tmp_path / "events.jsonl")].count("resumed") == 1


def test_resume_on_one_rank_from_two_continues_the_same_loss_trajectory(uninterrupted, token_data, tmp_path):
    run_dir = tmp_path / "one_rank"
    step_150 = uninterrupted / "checkpoints" / "step_00000150"
    # Same global batch: 1 rank × 2 accumulation steps = 2 ranks × 1.
    result = run_trainer(run_dir, token_data, ["max_steps=300", "grad_accum_steps=2", "checkpoint.save_every=0"],
                         ["--resume", str(step_150), "--stop-at-step", "170"], nproc=1)
    assert_ok(result)
    reference, resharded = losses_by_step(uninterrupted), losses_by_step(run_dir)
    for step in range(151, 171):
        assert resharded[step] == pytest.approx(reference[step], rel=1e-4), step
    resumed = [e for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == "resumed"]
    assert resumed[0]["saved_world_size"] == 2 and resumed[0]["world_size"] == 1


def test_master_weights_resume_an_adamw_checkpoint_and_write_one_the_plain_path_resumes(uninterrupted, token_data,
                                                                                      tmp_path):
    # parallel.master_weights on one rank (bf16 compute copies, gradients summed over 2 micro-steps in fp32)
    # picks up the fp32 reference run's checkpoint...
    master = tmp_path / "master"
    step_150 = uninterrupted / "checkpoints" / "step_00000150"
    assert_ok(run_trainer(master, token_data, ["max_steps=300", "grad_accum_steps=2", "checkpoint.save_every=0",
                                               "parallel.master_weights=true", "parallel.param_dtype=bfloat16"],
                          ["--resume", str(step_150), "--stop-at-step", "170"], nproc=1))
    reference, trained = losses_by_step(uninterrupted), losses_by_step(master)
    for step in range(151, 171):
        # The reference computes in fp32 on CPU; this run in bf16.
        assert trained[step] == pytest.approx(reference[step], rel=0.03), step
    # ... and its checkpoint holds fp32 weights and AdamW's state only, which the plain fp32 path resumes.
    state = full_state(master / "checkpoints" / "step_00000170", tmp_path)
    reference_state = full_state(step_150, tmp_path)
    assert state["model"].keys() == reference_state["model"].keys()
    assert all(tensor.dtype == torch.float32 for tensor in state["model"].values())
    assert state["optimizer"]["state"].keys() == reference_state["optimizer"]["state"].keys()
    back = tmp_path / "back"
    assert_ok(run_trainer(back, token_data, ["max_steps=300", "grad_accum_steps=2", "checkpoint.save_every=0"],
                          ["--resume", str(master / "checkpoints" / "step_00000170"), "--stop-at-step", "175"],
                          nproc=1))
    resumed = losses_by_step(back)
    for step in range(171, 176):
        assert resumed[step] == pytest.approx(reference[step], rel=0.03), step


def test_how_weights_are_grouped_gathered_and_replicated_changes_the_traffic_not_the_losses(token_data, tmp_path):
    # Evaluation and a save fall between accumulated steps: both must see the sharded parameters again.
    common = ["max_steps=6", "grad_accum_steps=3", "eval.every=2", "checkpoint.save_every=3"]
    modes = {"kept": ["parallel.accumulate_unsharded=true"], "resharded": ["parallel.accumulate_unsharded=false"],
             "units_of_3_blocks": ["parallel.accumulate_unsharded=true", "parallel.fsdp_unit_blocks=3"],
             # micro-steps on a plain replica per rank: weights gathered and gradients reduced once a step
             "replica": ["parallel.micro_steps=replica"]}
    for name, overrides in modes.items():
        assert_ok(run_trainer(tmp_path / name, token_data, [*common, *overrides]))
    reference = losses_by_step(tmp_path / "kept")
    assert sorted(reference) == list(range(1, 7))
    for name in ("resharded", "units_of_3_blocks", "replica"):
        assert losses_by_step(tmp_path / name) == reference, name
        assert_same_tensors(full_state(tmp_path / name / "checkpoints" / "step_00000006", tmp_path),
                            full_state(tmp_path / "kept" / "checkpoints" / "step_00000006", tmp_path))


def test_a_replica_gathers_and_reduces_rows_that_do_not_divide_over_the_ranks(token_data, tmp_path):
    # A vocabulary of 4,097 (every other row count of the tiny model is even): FSDP gives the ranks 2,049 and 2,048
    # embedding rows and pads the second's; the replica's flat buffers must agree.
    common = ["max_steps=3", "grad_accum_steps=2", "model.vocab_size=4097", "checkpoint.save_every=3"]
    for mode, overrides in (("fsdp", []), ("replica", ["parallel.micro_steps=replica"])):
        assert_ok(run_trainer(tmp_path / mode, token_data, [*common, *overrides]))
    assert losses_by_step(tmp_path / "replica") == losses_by_step(tmp_path / "fsdp")
    assert_same_tensors(full_state(tmp_path / "replica" / "checkpoints" / "step_00000003", tmp_path),
                        full_state(tmp_path / "fsdp" / "checkpoints" / "step_00000003", tmp_path))


def test_model_only_checkpoint_is_refused_unless_the_optimizer_is_reset_explicitly(uninterrupted, token_data, tmp_path):
    source = uninterrupted / "checkpoints" / "step_00000150"
    model = Transformer(load_model_config("tiny"))
    meta = load_model_weights(source, model)
    model_only = write_model_only_checkpoint(model, tmp_path / "imported" / "step_00000150", meta)
    assert verify_checkpoint(model_only) is None

    run_dir = tmp_path / "incident"
    refused = run_trainer(run_dir, token_data, ["max_steps=160", "checkpoint.save_every=0"],
                          ["--resume", str(model_only)])
    assert refused.returncode != 0
    assert "no optimizer state" in refused.stderr and "--reset-optimizer" in refused.stderr
    assert not list_checkpoints(run_dir)

    accepted = run_trainer(run_dir, token_data, ["max_steps=160", "checkpoint.save_every=0"],
                           ["--resume", str(model_only), "--reset-optimizer"])
    assert_ok(accepted)
    assert "optimizer reset at step 150" in accepted.stderr
    events = [e["event"] for e in read_jsonl(run_dir / "events.jsonl")]
    assert "optimizer_reset" in events
    assert latest_checkpoint(run_dir).step == 160


def test_an_injected_nan_is_skipped_and_counted_and_training_continues(token_data, tmp_path):
    result = run_trainer(tmp_path, token_data, ["max_steps=12", "checkpoint.save_every=0"],
                         env={"GENESIS_INJECT_NAN_STEPS": "5"})
    assert_ok(result)
    skipped = [e for e in read_jsonl(tmp_path / "events.jsonl") if e["event"] == "nonfinite_step_skipped"]
    assert [e["step"] for e in skipped] == [5]
    latest = json.loads((tmp_path / "latest.json").read_text())
    assert latest["status"] == "completed" and latest["step"] == 12 and latest["nonfinite_skipped"] == 1


def test_k_nonfinite_steps_in_a_row_stop_the_run_and_keep_the_last_good_checkpoint(token_data, tmp_path):
    result = run_trainer(tmp_path, token_data, ["max_steps=20", "checkpoint.save_every=4",
                                                "stability.max_consecutive_nonfinite=3"],
                         env={"GENESIS_INJECT_NAN_STEPS": "6,7,8"})
    assert result.returncode != 0  # the trainer exits 3; torchrun reports any failed child as 1
    assert "3 non-finite steps in a row" in result.stderr
    assert latest_checkpoint(tmp_path).step == 4
    verify_checkpoint(latest_checkpoint(tmp_path).path)
    assert json.loads((tmp_path / "latest.json").read_text())["status"] == "stopped_nonfinite"


def test_a_rank_stuck_past_the_collective_timeout_ends_the_job_with_one_line_instead_of_hanging(token_data, tmp_path):
    run_dir = tmp_path / "late_rank"
    # Rank 1 arrives 12 s late at the step-3 checkpoint; rank 0's save deadline ends the job after 3 s, so its
    # error (not rank 1's arrival) is what ends the wait.
    result = run_trainer(run_dir, token_data, ["max_steps=6", "checkpoint.save_every=3", "checkpoint.async_save=false",
                                               "parallel.nccl_timeout_s=3"],
                         env={"GENESIS_DELAY_SAVE": "1:12"}, timeout=120)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines()
              if line.startswith("error: rank 0: the checkpoint save at step 3 did not finish within")]
    assert errors and "parallel.nccl_timeout_s=3 s" in errors[0] and "--resume auto" in errors[0], result.stderr[-3000:]
    assert "exitcode  : 4" in result.stderr  # the rank's own code, in torchrun's report (torchrun itself exits 1)
    assert max(losses_by_step(run_dir)) == 3  # it trained to the save and failed there, not at start-up
    assert not list_checkpoints(run_dir)  # the interrupted save left nothing that resume would trust


def test_a_rendezvous_port_in_use_is_one_line_naming_master_port_and_writes_nothing(token_data, tmp_path):
    run_dir = tmp_path / "run"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        command = [sys.executable, "-m", "genesis_model.train", "--config", str(TINY_CPU), f"data_dir={token_data}",
                   f"run_dir={run_dir}", *FAST_OVERRIDES, "max_steps=2"]
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: cannot open the rendezvous port MASTER_PORT={port}: it is in use; unset MASTER_PORT "
                      f"(a free port is picked) or give torchrun --master_port a free one"], result.stderr[-2000:]
    assert not run_dir.exists()


def test_keep_last_prunes_rolling_checkpoints_but_never_milestones(token_data, tmp_path):
    assert_ok(run_trainer(tmp_path, token_data, ["max_steps=30", "checkpoint.save_every=5", "checkpoint.keep_last=2",
                                                 "checkpoint.milestone_every=10"]))
    rolling = [ref.step for ref in list_checkpoints(tmp_path) if not ref.milestone]
    milestones = [ref.step for ref in list_checkpoints(tmp_path) if ref.milestone]
    assert milestones == [10, 20, 30]
    assert rolling == [15, 25]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith((".tmp", ".trash"))]


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_sigkill_of_the_launcher_during_saves_never_leaves_a_checkpoint_resume_would_trust(async_save, token_data,
                                                                                          tmp_path):
    """20 kills of the launcher's process group (torchrun, 2 gloo ranks; what a scheduler or an OOM killer does)
    at random moments while checkpoints are being written, with synchronous and with asynchronous saves (which
    run their collectives on a group of their own: sharing gloo's default group aborted at the first save). No
    rank outlives a kill, everything carrying a marker is whole, and every later --resume auto starts from the
    newest complete checkpoint and trains on."""
    rng = random.Random(0)
    run_dir = tmp_path / "crashy"
    target = 400
    command = trainer_command(TINY_CPU, [f"data_dir={token_data}", f"run_dir={run_dir}", *FAST_OVERRIDES,
                                         f"max_steps={target}", "checkpoint.save_every=1", "checkpoint.keep_last=3",
                                         f"checkpoint.async_save={str(async_save).lower()}"],
                              nproc=2, trainer_args=["--resume", "auto"])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    deadline = time.time() + 900
    kills = 0
    while kills < 20 and time.time() < deadline:
        before = latest_checkpoint(run_dir)
        log = tmp_path / f"launch-{kills}.log"
        with open(log, "w") as stderr:
            launcher = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=stderr,
                                        start_new_session=True)
        # Wait until this launch has a save under way (a temporary directory it created), then kill.
        launched_ns = time.time_ns()
        wait_until = time.time() + 90
        while time.time() < wait_until and launcher.poll() is None:
            try:
                saving = [p for p in (run_dir / "checkpoints").glob(".tmp-step_*") if p.stat().st_mtime_ns >= launched_ns]
            except FileNotFoundError:  # renamed or removed while we looked
                saving = []
            if saving:
                break
            time.sleep(0.002)
        assert launcher.poll() is None, log.read_text()[-3000:]
        ranks = [child.pid for child in psutil.Process(launcher.pid).children(recursive=True)]
        # A step takes ~0.1 s and every step saves, so this lands at random phases of the next few saves.
        time.sleep(rng.uniform(0, 1.0))
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait()
        kills += 1
        gone_by = time.time() + 30
        while time.time() < gone_by and (any(alive(pid) for pid in ranks)
                                         or RunDir(run_dir).train_lock().is_held_elsewhere()):
            time.sleep(0.05)
        assert not [pid for pid in ranks if alive(pid)], "a rank outlived its launcher"
        newest = latest_checkpoint(run_dir)
        if before is not None:
            assert newest is not None and newest.step >= before.step
        for ref in list_checkpoints(run_dir):
            verify_checkpoint(ref.path)  # everything that carries a marker is whole
    assert kills == 20

    newest = latest_checkpoint(run_dir)
    assert newest is not None and newest.step >= 10, "the kills should interrupt a run that makes progress"
    # Then it trains on from there (10 steps are enough to show it; the schedule stays that of max_steps).
    result = subprocess.run([*command, "--stop-at-step", str(newest.step + 10)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {newest.path} at step {newest.step}" in result.stderr
    assert latest_checkpoint(run_dir).step == newest.step + 10
    assert not [p for p in (run_dir / "checkpoints").iterdir() if not (p / MARKER).is_file()]
