"""Where the data stage's work items run: one process in order, or a Dask cluster.

Every phase of the stage is a list of independent jobs (a function and its arguments; each writes its own
output file and returns a small summary), so the phase can run anywhere that maps a function over jobs:

    SerialExecutor()                   in this process, in order (tests, debugging, one-core boxes)
    DaskExecutor(workers=8)            a Dask LocalCluster of 8 one-thread worker processes on this box
    DaskExecutor(address="tcp://…")    an existing Dask cluster (its workers must see the data directory)

A flow can pass its own executor (the data flow maps the jobs as Prefect tasks on prefect-dask's runner).

The executor reports progress as jobs finish: documents and bytes done, MB/s and an ETA, as a tqdm bar on a
terminal and as one log line every `log_every_s` seconds otherwise.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import resource
import sys
import time
from collections.abc import Callable, Sequence
from typing import Protocol

logger = logging.getLogger("genesis.data")


def peak_rss_kib() -> int:
    """This process's peak resident memory so far (KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def current_rss_kib() -> int:
    import psutil

    return psutil.Process().memory_info().rss // 1024


@functools.cache
def _libc_malloc_trim():
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        return None


def release_memory() -> None:
    """Give back to the OS what a finished job freed: Arrow's pool keeps freed buffers and glibc's malloc keeps
    freed heap pages, so a worker's resident memory ratcheted up job after job (a verification job started from
    the last one's 240 MB instead of 130 MB, measured on 1 GB)."""
    import pyarrow as pa

    pa.default_memory_pool().release_unused()
    if (trim := _libc_malloc_trim()) is not None:
        trim(0)


def stage_job(function):
    """A job of the data stage: its summary also says its process's memory, resident when it started
    (`start_rss_kib`) and the peak so far when it ended (`peak_rss_kib`), so report.json's `_jobs` says in which
    phase a worker grows, and whether by what a job holds or by what the process kept from jobs before. What the
    job freed is given back to the OS before the next (`release_memory`)."""

    @functools.wraps(function)
    def job(*args, **kwargs):
        started_at = current_rss_kib()
        try:
            summary = function(*args, **kwargs)
            if isinstance(summary, dict):
                summary |= {"start_rss_kib": started_at, "peak_rss_kib": peak_rss_kib()}
            return summary
        finally:
            release_memory()

    return job


class Progress:
    """Counts what finished jobs report (`docs`, `bytes`) against the phase's expected total bytes."""

    def __init__(self, label: str, total_jobs: int, total_bytes: int | None, log: Callable[[str], None] | None = None,
                 log_every_s: float = 10.0):
        self.label, self.total_jobs, self.total_bytes = label, total_jobs, total_bytes
        self.jobs = self.docs = self.bytes = 0
        self.started = self.last_log = time.monotonic()
        self.log, self.log_every_s = log, log_every_s
        self.bar = None
        if log is None and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_bytes or None, unit="B", unit_scale=True, desc=label, leave=True,
                            dynamic_ncols=True)

    def update(self, summary: dict | None) -> None:
        summary = summary or {}
        self.jobs += 1
        self.docs += int(summary.get("docs", 0))
        done_bytes = int(summary.get("bytes", 0))
        self.bytes += done_bytes
        if self.bar is not None:
            self.bar.update(done_bytes)
            self.bar.set_postfix_str(f"{self.jobs}/{self.total_jobs} jobs, {self.docs:,} docs")
        elif time.monotonic() - self.last_log >= self.log_every_s or self.jobs == self.total_jobs:
            self.last_log = time.monotonic()
            self._emit(self.line())

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = self.bytes / elapsed
        eta = ""
        if self.total_bytes and rate > 0 and self.bytes < self.total_bytes:
            eta = f", ETA {(self.total_bytes - self.bytes) / rate:,.0f} s"
        return (f"{self.label}: {self.jobs}/{self.total_jobs} jobs, {self.docs:,} docs, "
                f"{self.bytes / 1e6:,.1f} MB at {rate / 1e6:,.1f} MB/s{eta}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def _emit(self, line: str) -> None:
        (self.log or (lambda text: print(text, file=sys.stderr)))(line)


class Executor(Protocol):
    workers: int

    def map(self, function: Callable, jobs: Sequence[tuple], label: str, sizes: Sequence[int] | None = None) -> list:
        """`[function(*job) for job in jobs]`, results in job order."""
        ...

    def close(self) -> None: ...


class SerialExecutor:
    """Jobs in this process, in order."""

    workers = 1

    def __init__(self, log: Callable[[str], None] | None = None):
        self.log = log

    def map(self, function, jobs, label, sizes=None):
        progress = Progress(label, len(jobs), sum(sizes) if sizes else None, self.log)
        results = []
        try:
            for job in jobs:
                results.append(function(*job))
                progress.update(results[-1])
        finally:
            progress.close()
        return results

    def close(self) -> None:
        pass


def local_cluster_options(workers: int) -> dict:
    """The LocalCluster the stage starts on this box (DaskExecutor, and the data flow through prefect-dask).

    One thread per worker: the jobs are Python- and numpy-bound; processes, not threads, give parallelism.
    NOTE: memory_limit=0 leaves memory to the jobs' own bounds (one partition each) instead of Dask pausing and
    spilling workers whose RSS its heuristics misjudge. silence_logs: a job's error (e.g. one bad record) reaches
    the caller as its exception, said in one line there; the workers' own logs would only repeat it, and a worker
    whose heartbeat races the cluster's close logs a normal shutdown as an ERROR with a traceback. No dashboard;
    the scheduler's HTTP server (health and metrics routes, always started) on a free port: on its default 8787 a
    second cluster on the box (another prepare, a user's own) printed "UserWarning: Port 8787 is already in use"."""
    return {"n_workers": workers, "threads_per_worker": 1, "processes": True, "dashboard_address": None,
            "scheduler_kwargs": {"dashboard_address": ":0"}, "memory_limit": 0, "silence_logs": logging.CRITICAL}


def share_one_malloc_arena() -> None:
    """Make the threads this process starts from now on allocate from glibc's main malloc arena.

    NOTE: glibc gives each new thread an arena of its own (up to 8 per core), and what a thread frees stays in
    its arena. `genesis data prepare`'s driver trains SentencePiece with `tokenizer.threads` (8) threads: over the
    same 200,000-sentence sample its peak rose 55-72 MB above the one-arena figure, differently from run to run,
    and that noise was the driver's peak growth between corpus sizes (0.25 and 3 GB: 0.62 and 0.686 GiB, the
    sample the same size). With one arena the training stays at the sample's own footprint, as fast (6.7-7.3 s
    against 6.6-7.8 s). Called where the driver starts, before any thread; no-op where the C library is not glibc.
    """
    import ctypes
    import ctypes.util

    m_arena_max = -8  # glibc's malloc.h
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(m_arena_max, 1)
    except (OSError, AttributeError):
        pass


@contextlib.contextmanager
def worker_spawn_environment():
    """Start a LocalCluster's workers inside this: they keep glibc's own malloc thresholds.

    NOTE: Dask's nannies export MALLOC_TRIM_THRESHOLD_=65536 to the workers they spawn, so that freed heap is
    returned to the OS eagerly; setting it also fixes glibc's mmap threshold, and a tokenize job, which builds
    and drops tens of MB of Python lists a part, then maps and unmaps them again and again: 3.81 against
    4.27 MB/s in one process with and without it, and 3.83-3.90 against 4.08-4.32 MB/s in a one-worker cluster
    over the 0.25 GB scale corpus's 60 parts. Every job already gives its memory back when it ends
    (`release_memory`), so the workers lose nothing by going without it."""
    import dask
    import distributed  # noqa: F401  first imported inside the scope, its config defaults would leave with it

    with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
        yield


class DaskExecutor:
    """Jobs on a Dask cluster: a LocalCluster of `workers` one-thread processes, or the one at `address`."""

    def __init__(self, workers: int = 1, address: str | None = None, log: Callable[[str], None] | None = None):
        from distributed import Client, LocalCluster

        self.log = log
        self.cluster = None
        if address:
            self.client = Client(address)
        else:
            with worker_spawn_environment():
                self.cluster = LocalCluster(**local_cluster_options(workers))
            self.client = Client(self.cluster)
        self.workers = len(self.client.scheduler_info().get("workers", {})) or workers

    def map(self, function, jobs, label, sizes=None):
        from distributed import as_completed

        progress = Progress(label, len(jobs), sum(sizes) if sizes else None, self.log)
        futures = [self.client.submit(function, *job, pure=False, priority=-index) for index, job in enumerate(jobs)]
        try:
            for future in as_completed(futures):
                progress.update(future.result())
            return [future.result() for future in futures]
        finally:
            progress.close()
            for future in futures:
                future.release()

    def close(self) -> None:
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()


def make_executor(kind: str, workers: int, address: str | None = None,
                  log: Callable[[str], None] | None = None) -> Executor:
    if kind == "serial":
        return SerialExecutor(log)
    if kind == "dask":
        return DaskExecutor(workers, address, log)
    raise ValueError(f"executor {kind!r}: one of serial, dask")
