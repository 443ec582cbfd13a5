"""A multi-rank failure is one line (issue #23, item 9): `genesis train --nproc N` prints one `error:` line, from
the rank that saw the cause, and exits with that rank's code; a signal to it still stops every rank. Real torchrun,
2 gloo ranks on CPU."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from genesis.run_dir import RunDir, list_checkpoints
from genesis_model.launch import trainer_command
from tests.conftest import FAST_OVERRIDES, REPO, TINY_CPU, read_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.integration]

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def genesis_train(run_dir, data_dir, overrides=(), flags=(), env=None) -> list[str]:
    return [sys.executable, "-m", "cli.main", "train", "--nproc", "2", "--config", str(TINY_CPU),
            f"data_dir={data_dir}", f"run_dir={run_dir}", *FAST_OVERRIDES, *overrides, *flags]


def run(command: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO, env={**ENV, **(env or {})})


def the_one_error_line(result: subprocess.CompletedProcess) -> str:
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-4000:]
    for noise in ("Traceback", "ChildFailedError", "stuck or gone"):
        assert noise not in result.stderr, result.stderr[-4000:]
    return errors[0]


def test_bad_data_is_one_line_from_rank_0_with_bad_inputs_exit_code(tmp_path):
    result = run(genesis_train(tmp_path / "run", tmp_path / "no_data", ["max_steps=2"]))
    line = the_one_error_line(result)
    assert line.startswith("error: rank 0: ") and "manifest.json" in line
    assert result.returncode == 2


def test_a_damaged_checkpoint_is_one_line_from_the_rank_that_verified_it(token_data, tmp_path):
    run_dir = tmp_path / "run"
    made = run(genesis_train(run_dir, token_data, ["max_steps=2", "checkpoint.save_every=2"]))
    assert made.returncode == 0, made.stderr[-4000:]
    shard = sorted(list_checkpoints(run_dir)[-1].path.glob("*.distcp"))[-1]  # rank 0 verifies every file
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))

    result = run(genesis_train(run_dir, token_data, ["max_steps=4"], ["--resume", "auto"]))
    line = the_one_error_line(result)  # rank 1, waiting for rank 0, does not blame a rank "stuck or gone"
    assert line.startswith("error: rank 0: ") and shard.name in line
    assert result.returncode == 2


def test_non_finite_steps_exit_with_their_own_code_in_one_line(token_data, tmp_path):
    result = run(genesis_train(tmp_path / "run", token_data, ["max_steps=10", "checkpoint.save_every=0"]),
                 env={"GENESIS_INJECT_NAN_STEPS": "2,3,4"})
    assert "non-finite steps in a row" in the_one_error_line(result)
    assert result.returncode == 3


def test_under_plain_torchrun_the_error_rank_0_passed_on_is_printed_once(tmp_path):
    command = trainer_command(TINY_CPU, [f"data_dir={tmp_path / 'no_data'}", f"run_dir={tmp_path / 'run'}",
                                         *FAST_OVERRIDES], nproc=2)
    result = run(command)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "manifest.json" in errors[0], result.stderr[-4000:]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_genesis_train_stops_every_rank_which_save_first(token_data, tmp_path, signum):
    run_dir = tmp_path / "run"
    log = tmp_path / "stderr.txt"
    command = genesis_train(run_dir, token_data, ["max_steps=100000", "checkpoint.save_every=0"])
    with open(log, "w") as stderr:
        launcher = subprocess.Popen(command, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not (RunDir(run_dir).metrics.is_file() and read_jsonl(RunDir(run_dir).metrics)):
            assert launcher.poll() is None, log.read_text()[-4000:]
            time.sleep(0.5)
        ranks = psutil.Process(launcher.pid).children(recursive=True)
        assert len(ranks) == 2, "both ranks should be training by now"

        launcher.send_signal(signum)
        assert launcher.wait(timeout=120) == 128 + signum
        psutil.wait_procs(ranks, timeout=10)
        assert not [rank.pid for rank in ranks if rank.is_running()], "a rank outlived the stop"
        assert list_checkpoints(run_dir), "the ranks were stopped without saving"
        assert "Traceback" not in log.read_text() and "error:" not in log.read_text(), log.read_text()[-4000:]
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
