"""Launch the trainer under torchrun, and run it as a child process group that cannot outlive its launcher.

`torchrun -m genesis_model.train` starts in its own session (process group), so stopping it reaches every
rank; and on Linux the kernel sends torchrun SIGTERM if the launcher dies, even by SIGKILL
(PR_SET_PDEATHSIG), after which torchrun stops its ranks. Without both, a cancelled flow run leaves ranks
training in the background (Prefect issue #17593).
"""

from __future__ import annotations

import ctypes
import os
import queue
import signal
import subprocess
import sys
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


def torchrun_command(nproc: int, *program: str) -> list[str]:
    """`program` ("-m module ..." or "script.py ...") under torchrun on this host, on a free rendezvous port
    (several runs may share a machine)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
            str(free_port()), *program]


def trainer_command(config_path: Path, overrides: list[str] = (), nproc: int = 1,
                    trainer_args: list[str] = ()) -> list[str]:
    """The one way the trainer is launched: `torchrun --nproc_per_node N -m genesis_model.train --config C
    [key=value ...] [trainer flags]`."""
    return torchrun_command(nproc, "-m", "genesis_model.train", "--config", str(config_path), *overrides,
                            *trainer_args)


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
