"""Process-group setup: torchrun's environment when present, a one-process group otherwise.

CUDA gets NCCL with the configured timeout (so a stuck collective fails loudly instead of hanging forever);
CPU gets gloo. Multi-node runs use torchrun's own rendezvous flags; nothing here invents a launcher.
"""

from __future__ import annotations

import datetime
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from genesis_model.launch import free_port, report_error


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    mesh: DeviceMesh

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device_type(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        from genesis.errors import ConfigError

        raise ConfigError("device: 'cuda' requested but no CUDA device is visible; set device: cpu or auto")
    return requested


# The process group's own timeout is `parallel.nccl_timeout_s` plus this grace, so the engine's deadline on a
# checkpoint save (`exit_if_longer_than`) ends a stuck job first, with one line. NOTE: on a timeout NCCL's
# watchdog aborts the process from a C++ thread (seen on 2 H200s: SIGABRT, a stack dump per rank, no Python
# exception), so the engine cannot turn it into a readable error afterwards; it has to come first.
COLLECTIVE_TIMEOUT_GRACE_S = 30


def collective_timeout(timeout_s: int) -> datetime.timedelta:
    """How long any process group of the run waits for a collective (see COLLECTIVE_TIMEOUT_GRACE_S)."""
    return datetime.timedelta(seconds=timeout_s + COLLECTIVE_TIMEOUT_GRACE_S)


@contextmanager
def exit_if_longer_than(seconds: float, message: str, exit_code: int = 4) -> Iterator[None]:
    """Run the block; if it is still running after `seconds`, report `message` (an `error: ...` line, through
    `launch.report_error`) and end the process with `exit_code`.

    The thread that waits is inside a C++ collective (which releases the GIL), so it cannot be interrupted;
    a timer thread prints the line and exits with `os._exit`. A save cut short leaves no completion marker,
    so resume ignores what it wrote and the last complete checkpoint stands.
    """

    def expire() -> None:
        report_error(message.removeprefix("error: "), exit_code, seen_by=int(os.environ.get("RANK", "0")))
        os._exit(exit_code)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


LAUNCHER_POLL_S = 0.5


def die_with_launcher(poll_s: float = LAUNCHER_POLL_S) -> threading.Thread:
    """End this process the moment the process that launched it is gone, however it went.

    NOTE: torch's elastic agent (torchrun) starts each rank in a session of its own, so `kill -9` of torchrun's
    process group, what a scheduler, an OOM killer or Prefect's SIGKILL fallback does, kills torchrun alone: the
    ranks would train on unattended and keep the run's lock, and the next `--resume auto` is refused. A rank
    whose parent has gone is re-parented, so a watcher of `getppid()` notices within `poll_s`. Not the kernel's
    PR_SET_PDEATHSIG: that fires when the parent *thread* that forked the rank exits, which the agent's worker
    threads may do while the agent lives. Work since the last checkpoint is lost, as in the kill that caused
    it; complete checkpoints are untouched (a save cut short has no marker)."""
    launcher = os.getppid()

    def watch() -> None:
        while os.getppid() == launcher:
            time.sleep(poll_s)
        os.kill(os.getpid(), signal.SIGKILL)

    watcher = threading.Thread(target=watch, name="die-with-launcher", daemon=True)
    watcher.start()
    return watcher


def init_distributed(device_type: str, timeout_s: int = 600) -> DistInfo:
    """Join (or create) the default process group and build a 1-D data-parallel mesh over it. Collectives
    give up after `timeout_s` plus `COLLECTIVE_TIMEOUT_GRACE_S`. A rank started by torchrun dies with it
    (`die_with_launcher`)."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        die_with_launcher()
    if "RANK" not in os.environ:
        # Plain `python -m genesis_model.train`: behave as a one-rank torchrun job.
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        try:
            dist.init_process_group(
                backend=backend,
                timeout=collective_timeout(timeout_s),
                device_id=device if backend == "nccl" else None,
            )
        except dist.DistNetworkError as err:
            if "EADDRINUSE" not in str(err):
                raise
            # The rendezvous port is taken, often by a MASTER_PORT exported in the shell for another job.
            from genesis.errors import ConfigError

            raise ConfigError(f"cannot open the rendezvous port MASTER_PORT={os.environ.get('MASTER_PORT')}: it is "
                              f"in use; unset MASTER_PORT (a free port is picked) or give torchrun --master_port a "
                              f"free one") from err
    mesh = init_device_mesh(device_type, (world_size,), mesh_dim_names=("dp",))
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=device, mesh=mesh)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
