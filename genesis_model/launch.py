"""Launch the trainer under torchrun, and run it as a child process group that cannot outlive its launcher.

`torchrun -m genesis_model.train` starts in its own session (process group), so stopping it reaches every
rank; and on Linux the kernel sends torchrun SIGTERM if the launcher dies, even by SIGKILL
(PR_SET_PDEATHSIG), after which torchrun stops its ranks. Without both, a cancelled flow run leaves ranks
training in the background (Prefect issue #17593).

`genesis train --nproc N` runs torchrun's own agent in its process (`run_torchrun`) so that a failed job says
one line: each rank hands its error to the launcher (`report_error`) instead of printing it, and the launcher
prints the one from the rank that saw the cause, with that rank's exit code, in place of torchrun's report.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import queue
import signal
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from genesis.config import REPO_ROOT

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    os.setsid()
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:  # not Linux: the session and the launcher's signal handlers still apply
        pass


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun_args(nproc: int, *program: str) -> list[str]:
    """torchrun's arguments for `program` ("-m module ..." or "script.py ...") on this host, on a free
    rendezvous port (several runs may share a machine)."""
    return ["--nproc_per_node", str(nproc), "--master_port", str(free_port()), *program]


def torchrun_command(nproc: int, *program: str) -> list[str]:
    """`program` under torchrun on this host (see `torchrun_args`)."""
    return [sys.executable, "-m", "torch.distributed.run", *torchrun_args(nproc, *program)]


def trainer_program(config_path: Path, overrides: list[str] = (), trainer_args: list[str] = ()) -> list[str]:
    """`-m genesis_model.train --config C [key=value ...] [trainer flags]`: what torchrun runs on every rank."""
    return ["-m", "genesis_model.train", "--config", str(config_path), *overrides, *trainer_args]


def trainer_command(config_path: Path, overrides: list[str] = (), nproc: int = 1,
                    trainer_args: list[str] = ()) -> list[str]:
    """The one way the trainer is launched: `torchrun --nproc_per_node N -m genesis_model.train --config C
    [key=value ...] [trainer flags]`."""
    return torchrun_command(nproc, *trainer_program(config_path, overrides, trainer_args))


# ---------------------------------------------------------------------------------------------------------------
# One line for a failed job. NOTE: torch's own error files (TORCHELASTIC_ERROR_FILE, @record) do not fit: its
# "root cause" is the failure with the earliest timestamp, to the second, whatever it was (a rank that merely lost
# its peer fails within the same second as the peer), and it is reported as a 40-line block.

ERROR_DIR_ENV = "GENESIS_ERROR_DIR"
# A rank that saw only a symptom (a collective failed because another rank left) waits this long for the rank that
# saw the cause to record it: the first rank to exit makes torchrun stop the others, perhaps before they can.
SYMPTOM_GRACE_S = 3.0


def report_error(message: str, code: int, seen_by: int | None) -> None:
    """Say a rank's one-line error. `seen_by`: the rank that saw the cause (this one, or the one whose error a
    collective check passed on); None when this rank saw only a symptom of another rank's failure.

    Under `run_torchrun` the error goes to the launcher, which prints one line for the job. Otherwise (one
    process, plain torchrun) this rank prints it, unless it was passed on: the rank that saw it prints it."""
    rank = int(os.environ.get("RANK", "0"))
    error_dir = os.environ.get(ERROR_DIR_ENV)
    if error_dir is None:
        if seen_by in (None, rank):
            sys.stderr.flush()
            os.write(2, f"error: {message}\n".encode())  # one write: ranks share stderr, lines must not interleave
        return
    record = Path(error_dir) / f"rank_{rank:05d}.json"
    partial = record.with_suffix(".partial")
    partial.write_text(json.dumps({"rank": rank, "seen_by": seen_by, "code": code, "message": message,
                                   "time": time.time()}))
    os.replace(partial, record)  # the launcher never reads half a record
    deadline = time.monotonic() + (SYMPTOM_GRACE_S if seen_by is None else 0)
    while time.monotonic() < deadline and not any(r["seen_by"] is not None for r in read_errors(error_dir)):
        time.sleep(0.05)


def read_errors(error_dir: str | Path) -> list[dict]:
    """The errors the ranks have recorded so far (see `report_error`)."""
    return [json.loads(path.read_text()) for path in sorted(Path(error_dir).glob("rank_*.json"))]


def _stopped(exitcode: int) -> bool:
    """A rank that torchrun stopped after another rank failed (SIGTERM, or the trainer's exit on it)."""
    return exitcode in (-signal.SIGTERM, 128 + signal.SIGTERM)


def failure_line(failures: dict, records: list[dict]) -> tuple[str, int]:
    """The one line and exit code of a failed job: an error from the rank that saw its cause; else a rank that
    ended without saying why (a bug's traceback, a signal); else a symptom (a rank stuck or gone)."""
    causes = sorted((r for r in records if r["seen_by"] is not None), key=lambda r: (r["time"], r["rank"]))
    if causes:
        rank, message = causes[0]["seen_by"], causes[0]["message"]
        line = message if message.startswith(f"rank {rank}: ") else f"rank {rank}: {message}"
        return f"error: {line}", causes[0]["code"]
    said = {r["rank"] for r in records}
    silent = sorted((rank, f.exitcode) for rank, f in failures.items() if rank not in said)
    crashed = [(rank, code) for rank, code in silent if not _stopped(code)]
    if crashed or not records:
        rank, code = (crashed or silent)[0]
        if code < 0:
            return f"error: rank {rank} was killed by {signal.Signals(-code).name}", 128 - code
        return f"error: rank {rank} exited with code {code} (its output above says why)", code
    symptom = min(records, key=lambda r: (r["time"], r["rank"]))
    return f"error: {symptom['message']}", symptom["code"]


def _quiet_torchrun_logs() -> None:
    # The agent's warnings (workers sent SIGTERM, a child failed) restate what the one line says.
    for name in ("torch.distributed.run", "torch.distributed.launcher", "torch.distributed.elastic"):
        logger = logging.getLogger(name)
        logger.addHandler(logging.NullHandler())
        logger.propagate = False


def run_torchrun(args: list[str]) -> int:
    """torchrun with `args`, its agent in this process; returns the job's exit code. The ranks' output passes
    through as it comes; a failure is one `error:` line (`failure_line`) and the code of the rank that saw the
    cause (2 bad input, 3 non-finite steps, 4 a failed collective). SIGTERM/SIGINT reach the ranks through the
    agent, which stops them and waits; the job then ends with 128 + the signal."""
    from torch.distributed import DistNetworkError
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.run import parse_args, run

    _quiet_torchrun_logs()
    error_dir = tempfile.mkdtemp(prefix="genesis-errors-")
    saved_env = {key: os.environ.get(key) for key in (ERROR_DIR_ENV, "OMP_NUM_THREADS")}
    # torchrun would set one thread per rank too, with a warning.
    os.environ.update({ERROR_DIR_ENV: error_dir, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    try:
        run(parse_args(args))
        return 0
    except ChildFailedError as err:
        line, code = failure_line(err.failures, read_errors(error_dir))
        print(line, file=sys.stderr)
        return code
    except SignalException as err:
        return 128 + int(err.sigval)
    except (RendezvousError, DistNetworkError) as err:
        first_line = (str(err).strip().splitlines() or [""])[0][:300]
        print(f"error: torchrun could not start the ranks ({type(err).__name__}: {first_line})", file=sys.stderr)
        return 1
    finally:
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(error_dir, ignore_errors=True)


class TrainerProcess:
    """The trainer under torchrun; `lines()` yields its output as it comes, `stop()` ends the whole group."""

    def __init__(self, command: list[str], env: dict | None = None):
        self.command = command
        full_env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
                    "PYTHONUNBUFFERED": "1", **(env or {})}
        self.process = subprocess.Popen(command, cwd=REPO_ROOT, env=full_env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, bufsize=1, preexec_fn=_die_with_parent)
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()

    def _pump(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    @property
    def pid(self) -> int:
        return self.process.pid

    def lines(self, timeout: float = 1.0) -> Iterator[str | None]:
        """Output lines; yields None every `timeout` seconds of silence so callers can poll other things.
        Ends when the process has exited and its output is drained."""
        while True:
            try:
                line = self._queue.get(timeout=timeout)
            except queue.Empty:
                yield None
                continue
            if line is None:
                self.process.wait()
                return
            yield line

    @property
    def returncode(self) -> int | None:
        return self.process.poll()

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM the process group, then SIGKILL whatever is left after `grace_s`."""
        if self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.time() + grace_s
        while time.time() < deadline and self.process.poll() is None:
            time.sleep(0.2)
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()


class StopOnSignals:
    """While active, SIGTERM/SIGINT to this process stop the trainer group first, then exit as signalled:
    what a process worker sends when a flow run is cancelled."""

    def __init__(self, trainer: TrainerProcess):
        self.trainer = trainer
        self.previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.trainer.stop(grace_s=20)
        previous = self.previous.get(signum)
        signal.signal(signum, previous if callable(previous) else signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.trainer.stop(grace_s=20)
        return False


def main(argv: list[str] | None = None) -> int:
    """`python -m genesis_model.launch [torchrun arguments]`: torchrun whose failures are one line."""
    return run_torchrun(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
