"""Helpers shared by the benchmarks: hardware description, timing, FLOP counts, JSON results."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
H100_BF16_PEAK_TFLOPS = 989.0  # dense bf16, SXM datasheet


def describe_machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()} CPU ×{os.cpu_count()}"


def environment() -> dict:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "machine": describe_machine(),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def train_flops_per_token(num_params: int, n_layers: int, dim: int, seq_len: int) -> float:
    """6N for the weight matmuls (forward + backward) plus 12·L·d·T for attention scores and values."""
    return 6 * num_params + 12 * n_layers * dim * seq_len


def measure_matmul_tflops(size: int = 8192, repeats: int = 20) -> float:
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        a @ b
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1000 / repeats
    return 2 * size**3 / seconds / 1e12


def write_synthetic_token_data(data_dir: Path, vocab_size: int, tokens: int, document, tokenizer_text: str) -> None:
    """One source ("web") in one shard of documents of 200–4,000 tokens, `document(rng, length)` giving each
    one's ids (EOS = 2 is appended), and a manifest. The tokenizer file is a placeholder: the trainer only
    checks its hash and vocabulary size."""
    import numpy as np

    from genesis.manifest import Manifest, SourceEntry, TokenizerEntry, sha256_file, write_manifest, write_shard

    rng = np.random.default_rng(0)
    tokenizer = data_dir / "tokenizer" / "tokenizer.model"
    tokenizer.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.write_bytes(tokenizer_text.encode())
    docs, total = [], 0
    while total < tokens:
        length = int(rng.integers(200, 4000))
        docs.append(np.append(document(rng, length), 2))
        total += length + 1
    entry = write_shard(data_dir / "web" / "shard_00000.arrow", docs, eos_id=2)
    entry.path = "web/shard_00000.arrow"
    write_manifest(data_dir, Manifest(
        tokenizer=TokenizerEntry(path="tokenizer/tokenizer.model", sha256=sha256_file(tokenizer),
                                 vocab_size=vocab_size, eos_id=2),
        sources=[SourceEntry(name="web", weight=1.0, shards=[entry])]))


def git_rev() -> str | None:
    """The revision measured: GENESIS_GIT_REV (set by the caller where the tree is a copy without .git, e.g. the
    device), else git's HEAD."""
    if os.environ.get("GENESIS_GIT_REV"):
        return os.environ["GENESIS_GIT_REV"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def command_line(script: str, argv: list[str] | None = None) -> str:
    """How the benchmark was called, for its run's record: `python bench/<script> <arguments>`."""
    return f"python bench/{script} {shlex.join(sys.argv[1:] if argv is None else argv)}".strip()


def _top_and_runs(path: Path) -> tuple[dict, list[dict]]:
    """A results file's top-level figures and its runs, oldest first."""
    existing = json.loads(path.read_text()) if path.is_file() else {}
    if "runs" not in existing:  # the file's whole content was one earlier run
        return {}, ([existing] if existing else [])
    return {k: v for k, v in existing.items() if k != "runs"}, existing["runs"]


def read_runs(path: Path) -> list[dict]:
    """The runs a results file holds, oldest first (a file written before runs were kept is one run)."""
    return _top_and_runs(path)[1]


def append_run(path: Path, run: dict, latest: dict, *, whole_top: bool = False) -> dict:
    """Append `run` to the file's `runs` (a file written before runs were kept becomes `runs[0]`) and set the
    top-level `latest` figures; nothing measured earlier is overwritten. `whole_top`: `latest` is the whole top
    level (the newest run, or figures recomputed from all runs), so the file's earlier top-level keys are
    dropped rather than left beside figures they no longer belong with; else they are kept where `latest`
    lacks them."""
    top, runs = _top_and_runs(path)
    return _write_runs(path, top, latest, [*runs, run], whole_top)


def _write_runs(path: Path, top: dict, latest: dict, runs: list[dict], whole_top: bool) -> dict:
    """Write `runs` under the top level: `latest` over the file's earlier `top`, or `latest` alone (`whole_top`)."""
    data = {**({} if whole_top else top), **latest, "runs": runs}
    write_json(path, data)
    return data


class CallRecord:
    """This call's run in a results file, for a benchmark that records as it measures (a sweep, one variant after
    another): the first `write` appends the run, later ones replace that same run and the top level in place.
    So a call cut off by its time limit leaves what it had measured, a finished call leaves one run, and no
    earlier run is touched."""

    def __init__(self, path: Path, *, whole_top: bool = False):
        self.path, self.whole_top = path, whole_top
        self.index: int | None = None  # this call's place in the file's runs, once appended

    def write(self, run: dict, latest: dict | None = None) -> dict:
        if self.index is None:
            data = append_run(self.path, run, latest or {}, whole_top=self.whole_top)
            self.index = len(data["runs"]) - 1
            return data
        top, runs = _top_and_runs(self.path)
        runs[self.index] = run
        return _write_runs(self.path, top, latest or {}, runs, self.whole_top)


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


class Stopwatch:
    def __enter__(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.start


def host_contention() -> dict:
    """The box's cores and load average (1, 5, 15 min) now: put beside any throughput figure, since a busy box
    (other engineers' jobs on a shared machine) slows a measurement without any change to the code."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (None, None, None)
    info = {"cpu_count": os.cpu_count(), "loadavg": [round(x, 2) for x in load if x is not None]}
    try:
        import psutil

        info["physical_cores"] = psutil.cpu_count(logical=False)
        info["memory_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    return info


def git_dirty(paths: tuple[str, ...] = ()) -> list[str]:
    """Uncommitted changes (`git status --porcelain` lines, limited to `paths` if given): a run measures the
    working tree, which git_rev alone does not describe when someone is editing it."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--", *paths], capture_output=True, text=True,
                             check=True, cwd=Path(__file__).resolve().parent.parent).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    return [line for line in out.splitlines() if line.strip()]
