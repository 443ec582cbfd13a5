"""The trainer on one GPU with genesis-1b: throughput, checkpoint blocking (sync vs async), size, resume time.

Runs the real entry point (`torchrun -m genesis_model.train`, configs/train/genesis-1b-h100.yaml) on
synthetic token shards, three times: sync saves, async saves, then a resume of the async run.

    python bench/checkpoint.py --workdir /tmp/ckbench --out bench/results/checkpoint.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import environment, write_json, write_synthetic_token_data  # noqa: E402
from genesis.run_dir import MetricsReader, RunDir  # noqa: E402
from genesis_model.launch import trainer_command  # noqa: E402

CONFIG = REPO / "configs" / "train" / "genesis-1b-h100.yaml"


def make_data(data_dir: Path, tokens: int = 4_000_000) -> None:
    write_synthetic_token_data(data_dir, 49152, tokens, lambda rng, length: rng.integers(4, 49152, size=length),
                               "synthetic 49152")


def command_for(run_dir: Path, data_dir: Path, overrides: list[str], resume: bool) -> list[str]:
    return trainer_command(CONFIG, [f"data_dir={data_dir}", f"run_dir={run_dir}", "micro_batch_size=8",
                                    "grad_accum_steps=1", "eval.every=0", "log_every=1", "verify_data_checksums=false",
                                    *overrides], nproc=1, trainer_args=["--resume", "auto"] if resume else [])


ENV = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", "") + os.pathsep + str(REPO)}


def read_jsonl(path: Path) -> list[dict]:
    """Events (any JSON line); metrics go through the run directory's own reader (`MetricsReader`)."""
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def read_metrics(run_dir: Path) -> list[dict]:
    return MetricsReader(RunDir(run_dir).metrics).all_rows()


def run(run_dir: Path, data_dir: Path, overrides: list[str]) -> tuple[list[dict], list[dict]]:
    result = subprocess.run(command_for(run_dir, data_dir, overrides, False), cwd=REPO, capture_output=True,
                            text=True, env=ENV)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    return read_metrics(run_dir), read_jsonl(RunDir(run_dir).events)


def time_resume(run_dir: Path, data_dir: Path, first_new_step: int) -> float:
    """Seconds from launching the process to the first resumed step being logged (monotonic clock)."""
    started = time.monotonic()
    process = subprocess.Popen(command_for(run_dir, data_dir, [f"max_steps={first_new_step + 1}",
                                                                "checkpoint.save_every=0", "checkpoint.save_at_end=false"], True),
                               cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while process.poll() is None:
        if any(m["step"] == first_new_step for m in read_metrics(run_dir)):
            elapsed = time.monotonic() - started
            process.wait()
            return elapsed
        time.sleep(0.05)
    raise RuntimeError(process.stderr.read()[-3000:])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/ckbench"))
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "checkpoint.json")
    parser.add_argument("--step-bench-tok-s", type=float, default=None,
                        help="bench/train_step.py genesis tokens/s at micro-batch 8 measured in the same call")
    args = parser.parse_args()
    import torch

    data_dir = args.workdir / "data"
    make_data(data_dir)
    results = {**environment(), "gpu": torch.cuda.get_device_name(0), "micro_batch": 8}
    common = ["max_steps=36", "checkpoint.save_every=12", "checkpoint.milestone_every=0", "checkpoint.keep_last=1"]

    _, sync_events = run(args.workdir / "sync", data_dir, common + ["checkpoint.async_save=false"])
    blocked_sync = [e["seconds"] for e in sync_events if e["event"] == "checkpoint_blocked"]
    shutil.rmtree(args.workdir / "sync")  # 12 GB checkpoints; the device's disk is 64 GB
    async_metrics, async_events = run(args.workdir / "async", data_dir, common + ["checkpoint.async_save=true"])
    # Blocked = the save call itself + the wait for staging before the next optimizer step.
    blocked_async = [e["seconds"] for e in async_events if e["event"] == "checkpoint_blocked"]
    staging_waits = [e["seconds"] for e in async_events if e["event"] == "checkpoint_staging_wait"]
    # Steady-state steps: after compilation warm-up, away from checkpoint steps.
    steady = [m["tokens_per_s"] for m in async_metrics if m["step"] % 12 not in (0, 1) and m["step"] >= 4]
    checkpoints = sorted((args.workdir / "async" / "checkpoints").glob("step_*"))
    print("checkpoints:", [p.name for p in checkpoints], flush=True)
    size_bytes = sum(p.stat().st_size for p in checkpoints[-1].rglob("*") if p.is_file())
    resume_s = time_resume(args.workdir / "async", data_dir, 37)
    results |= {
        "trainer_tok_s": round(statistics.median(steady), 1),
        "step_bench_tok_s": args.step_bench_tok_s,
        "blocked_s_sync": round(statistics.median(blocked_sync), 3),
        "blocked_s_sync_each": blocked_sync,
        "blocked_s_async": round(statistics.median([b + w for b, w in zip(blocked_async, staging_waits + [0.0] * 3)]), 3),
        "blocked_s_async_call_each": blocked_async,
        "staging_wait_s_each": staging_waits,
        "async_save_complete_s_each": [e["seconds"] for e in async_events if e["event"] == "checkpoint_saved"],
        "checkpoint_gib": round(size_bytes / 2**30, 3),
        "resume_s": round(resume_s, 1),
        "resume_note": "process launch → first resumed step logged, including model build, checkpoint verification "
                       "(sha256 of every file), DCP load and torch.compile of the first step",
    }
    write_json(args.out, results)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
