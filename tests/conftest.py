"""Shared test fixtures: synthetic token shards, and running the real trainer under torchrun."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from genesis.manifest import Manifest, SourceEntry, TokenizerEntry, sha256_file, write_manifest, write_shard
from genesis_model.launch import trainer_command

REPO = Path(__file__).resolve().parent.parent
# Prefect's temporary test servers should not phone home (and their telemetry writes contend for SQLite).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
SHARED = REPO.parent / "shared"
TINY_CPU = REPO / "configs" / "train" / "tiny-cpu.yaml"
# Small and fast: 2 ranks × 2 sequences × 64 tokens per step.
FAST_OVERRIDES = ["micro_batch_size=2", "seq_len=64", "eval.every=0", "log_every=1", "checkpoint.keep_last=10"]


def make_token_data(data_dir: Path, vocab_size: int = 4096, docs_per_shard: int = 120, seed: int = 0) -> Path:
    """Two sources of learnable synthetic documents (runs of arithmetic progressions), ending in EOS=2."""
    rng = np.random.default_rng(seed)
    tokenizer = data_dir / "tokenizer" / "tokenizer.model"
    tokenizer.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.write_bytes(b"synthetic tokenizer for tests " + str(vocab_size).encode())
    sources = []
    for index, (name, weight) in enumerate([("web", 0.7), ("code", 0.3)]):
        shards = []
        for shard_index in range(2):
            docs = []
            for _ in range(docs_per_shard):
                start, stride = rng.integers(3, vocab_size), 1 + index
                length = int(rng.integers(16, 200))
                docs.append([3 + (start + stride * i) % (vocab_size - 3) for i in range(length)] + [2])
            entry = write_shard(data_dir / name / f"shard_{shard_index:05d}.arrow", docs, eos_id=2)
            entry.path = str(Path(entry.path).relative_to(data_dir))
            shards.append(entry)
        sources.append(SourceEntry(name=name, weight=weight, shards=shards))
    tokenizer_entry = TokenizerEntry(path="tokenizer/tokenizer.model", sha256=sha256_file(tokenizer),
                                     vocab_size=vocab_size, eos_id=2)
    write_manifest(data_dir, Manifest(tokenizer=tokenizer_entry, sources=sources))
    return data_dir


@pytest.fixture(scope="session")
def token_data(tmp_path_factory) -> Path:
    """Read only (a test that changes data makes its own): one directory for all xdist workers, so that runs made
    in one worker (tests/test_trainer.py's reference run) resume in another on the very same data_dir."""
    return built_once(tmp_path_factory, "token_data", make_token_data)


def shared_tmp_root(tmp_path_factory) -> Path:
    """The temporary directory every xdist worker of this session sees (the session's own without xdist)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def built_once(tmp_path_factory, name: str, build: Callable[[Path], object]) -> Path:
    """`build(path)` once per test session, and its `path`. Under pytest-xdist each worker has session fixtures of
    its own; an expensive one is built by the first worker that asks, under a lock in the directory that the
    workers' temporary directories share, and the other workers wait for it and reuse it (read-only: a test that
    changes it copies it first). A build that failed is redone by the next worker that asks (and fails there too)."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        path = tmp_path_factory.mktemp(name)
        build(path)
        return path
    from filelock import FileLock

    root = shared_tmp_root(tmp_path_factory)
    path, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir()
            build(path)
            done.touch()
    return path


def run_trainer(run_dir: Path, data_dir: Path, overrides: list[str] = (), flags: list[str] = (), nproc: int = 2,
                env: dict | None = None, timeout: int = 600, config: Path = TINY_CPU) -> subprocess.CompletedProcess:
    """Run the real trainer as production does: torchrun, gloo on CPU, one process per rank."""
    command = trainer_command(config, [f"data_dir={data_dir}", f"run_dir={run_dir}", *FAST_OVERRIDES, *overrides],
                              nproc, trainer_args=flags)
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=REPO)


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr[-4000:]


def alive(pid: int) -> bool:
    """Whether process `pid` still runs (a zombie has ended, only not been reaped)."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def losses_by_step(run_dir: Path) -> dict[int, float]:
    """The last logged loss of each step (a resumed run re-logs nothing before its resume step)."""
    return {row["step"]: row["loss"] for row in read_jsonl(run_dir / "metrics.jsonl")}




# ---------------------------------------------------------------------------------------------------------------
# A real tiny trunk with a chat-capable tokenizer: the starting point of branch and orchestration tests.

TINY_CORPUS = """name: tiny-test
sources:
  - {name: prose, kind: builtin, subset: prose, weight: 0.5, max_docs: 400}
  - {name: dialog, kind: builtin, subset: dialog, weight: 0.5}
tokenizer: {vocab_size: 2048, sample_sentences: 20000}
docs_per_shard: 200
workers: 1
executor: serial
"""
TINY_TRUNK_OVERRIDES = ["model.vocab_size=2048", "micro_batch_size=8", "max_steps=150", "log_every=10",
                        "checkpoint.save_every=50", "checkpoint.milestone_every=150", "eval.every=75",
                        "optimizer.warmup_steps=10", "optimizer.lr=3e-3", "optimizer.min_lr=3e-4"]


def prepare_tiny_corpus(data_dir: Path) -> Path:
    from data_prep.pipeline import prepare
    from data_prep.sources import CorpusConfig
    from genesis.config import validate

    import yaml

    prepare(validate(CorpusConfig, yaml.safe_load(TINY_CORPUS), "tiny corpus"), data_dir)
    return data_dir


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """Built-in prose and the principle dialogues, tokenized with a 2,048-piece tokenizer with chat template."""
    return built_once(tmp_path_factory, "tiny_corpus", lambda root: prepare_tiny_corpus(root / "data")) / "data"


@pytest.fixture(scope="session")
def tiny_trunk(tiny_corpus, tmp_path_factory) -> Path:
    """A tiny model pretrained 150 steps on one rank, with a milestone at step 150."""

    def pretrain(root: Path) -> None:
        command = [sys.executable, "-m", "genesis_model.train", "--config", str(TINY_CPU), f"data_dir={tiny_corpus}",
                   f"run_dir={root / 'trunk'}", *TINY_TRUNK_OVERRIDES]
        result = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=REPO,
                                env={**os.environ, "OMP_NUM_THREADS": "2"})
        assert result.returncode == 0, result.stderr[-3000:]

    return built_once(tmp_path_factory, "tiny_trunk", pretrain) / "trunk"


def readable(text: str) -> str:
    """Pretraining text with the chat template's marker sentinels written as the markers they stand for."""
    from genesis.chat import SENTINEL_MARKERS

    return "".join(SENTINEL_MARKERS.get(char, char) for char in text)


@pytest.fixture(scope="module")
def harness():
    """A Prefect test server for the module's flow runs."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture()
def tracking(tmp_path, monkeypatch) -> str:
    """MLflow on a fresh SQLite store, as MLFLOW_TRACKING_URI."""
    uri = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


# ---------------------------------------------------------------------------------------------------------------
# `genesis demo --quick`, once per session: the commands it prints (test_first_minutes) and the tree it grows
# (test_flows: a later cycle of its trunk)

# What a plain shell lacks: the commands the demo prints must carry what these set.
PLAIN_SHELL_DROPS = ("GENESIS_HOME", "MLFLOW_TRACKING_URI", "PREFECT_HOME", "PREFECT_API_URL")


def _run_demo(work: Path) -> None:
    env = {key: value for key, value in os.environ.items() if key not in PLAIN_SHELL_DROPS}
    env.update(GENESIS_HOME=str(work / "mlflow"), PREFECT_HOME=str(work / "prefect"), OMP_NUM_THREADS="1",
               PREFECT_SERVER_ANALYTICS_ENABLED="false")
    done = subprocess.run([sys.executable, "-m", "cli.main", "demo", "--quick", "--workdir", str(work / "demo"),
                           "--summary-json", str(work / "summary.json")], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=1800)
    output = done.stdout + done.stderr
    (work / "demo.log").write_text(output)
    (work / "demo.stdout").write_text(done.stdout)
    assert done.returncode == 0, output[-5000:]


@pytest.fixture(scope="session")
def demo_work(tmp_path_factory) -> Path:
    """`genesis demo --quick` into a temporary directory, once for all xdist workers."""
    return built_once(tmp_path_factory, "demo", _run_demo)


@pytest.fixture()
def demo_run(demo_work, tmp_path_factory):
    """The session's `genesis demo --quick`, its registry and Prefect home in its directory too (set through the
    environment, so the commands it prints have to carry them). Held under a lock for the test: a test in another
    xdist worker never uses it at the same time (test_flows grows its trunk; test_first_minutes serves it)."""
    from filelock import FileLock

    with FileLock(str(shared_tmp_root(tmp_path_factory) / "demo.in-use.lock")):
        yield {"work": demo_work, "output": (demo_work / "demo.log").read_text(),
               "stdout": (demo_work / "demo.stdout").read_text(),
               "summary": json.loads((demo_work / "summary.json").read_text())}
