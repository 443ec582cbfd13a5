"""Genesis on two GPUs of one host: scaling, PCIe mode, the NCCL smoke matrix, resharding, memory, no hang.

Every figure comes from the real entry point (`torchrun -m genesis_model.train`) on synthetic token shards,
with configs/train/genesis-1b-2x4090.yaml (the reference run's settings) and a few overrides:

0. collectives: all-gather and reduce-scatter bandwidth at FSDP's sizes, P2P on and off (bench/collectives.py);
1. scaling: tokens/s on 1 GPU and on 2 GPUs at the same micro-batch and accumulation, with NCCL peer-to-peer
   on and with `NCCL_P2P_DISABLE=1` (the reference run's PCIe setting); MFU per GPU;
2. the smoke matrix on NCCL with DCP checkpoints: 100+ steps of training only; a 220-step run saving at 150;
   a new process resuming 150 → 300 with a second save at 300; async checkpoint blocking time;
3. the same global batch on 1 GPU (accumulation 2) and on 2 GPUs (accumulation 1): the largest relative loss
   difference over 50 steps;
4. reshard: the 2-GPU checkpoint at 150 resumed on 1 GPU, against the 2-GPU resume over steps 151–170;
5. memory: peak GiB per GPU at micro-batch 1 with 2-way FSDP;
6. no hang: a rank that arrives late at a checkpoint (`GENESIS_DELAY_SAVE`) within the collective timeout
   completes; one later than the timeout ends the job with a one-line error within the timeout plus a margin.

    python bench/two_gpu.py --workdir /tmp/two_gpu --out bench/results/two_gpu.json
    python bench/two_gpu.py --cpu-dry-run --workdir /tmp/two_gpu_cpu --out /tmp/two_gpu_cpu.json
    python bench/two_gpu.py --only smoke --update   # one section at a time, keeping the others' figures

`--cpu-dry-run` runs the same matrix with the tiny model on 2 gloo ranks (the script's own check on a
machine without GPUs; its figures say nothing about GPUs).
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

import numpy as np  # noqa: E402

from bench.checkpoint import read_jsonl  # noqa: E402
from bench.common import environment, write_json, write_synthetic_token_data  # noqa: E402
from genesis.launch import free_port  # noqa: E402
from genesis_model.checkpoint import is_complete  # noqa: E402

PROFILES = {
    "gpu": {
        "config": REPO / "configs" / "train" / "genesis-1b-2x4090.yaml",
        "vocab_size": 49_152,
        "micro_batch": 1,
        # NOTE: accumulation 1 outside the scaling runs (the config's 64 would make the 300-step smoke matrix
        # 40M tokens), and the reshard check's 1-GPU run doubles it to keep the global batch.
        "overrides": ["grad_accum_steps=1", "eval.every=0", "log_every=1", "verify_data_checksums=false",
                      "checkpoint.milestone_every=0", "checkpoint.keep_last=3"],
        "scaling_accum": 8,
        "collective_megabytes": [100, 1000],
        "timeout_s": 60,
    },
    "cpu": {
        "config": REPO / "configs" / "train" / "tiny-cpu.yaml",
        "vocab_size": 4096,
        "micro_batch": 2,
        "overrides": ["seq_len=64", "eval.every=0", "log_every=1", "verify_data_checksums=false",
                      "checkpoint.milestone_every=0", "checkpoint.keep_last=3"],
        "scaling_accum": 2,
        "collective_megabytes": [4],
        "timeout_s": 20,
    },
}


def make_learnable_data(data_dir: Path, vocab_size: int, tokens: int = 3_000_000) -> None:
    """Token shards whose documents count upwards from a random start (mod the vocabulary): learnable in a few
    dozen steps, so "the loss went down" means something; uniform random tokens would sit at ln V."""
    write_synthetic_token_data(
        data_dir, vocab_size, tokens,
        lambda rng, length: 3 + (int(rng.integers(0, vocab_size)) + np.arange(length)) % (vocab_size - 3),
        f"synthetic counting {vocab_size}")


class Runner:
    def __init__(self, profile: dict, data_dir: Path):
        self.profile = profile
        self.data_dir = data_dir

    def command(self, run_dir: Path, nproc: int, overrides: list[str], flags: list[str]) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_port", str(free_port()), "-m", "genesis_model.train", "--config", str(self.profile["config"]),
                f"data_dir={self.data_dir}", f"run_dir={run_dir}", f"micro_batch_size={self.profile['micro_batch']}",
                *self.profile["overrides"], *overrides, *flags]

    def run(self, run_dir: Path, nproc: int, overrides: list[str] = (), flags: list[str] = (), env: dict | None = None,
            check: bool = True, timeout: float | None = None) -> subprocess.CompletedProcess:
        full_env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(REPO)])),
                    **(env or {})}
        print(f"[{time.strftime('%H:%M:%S')}] {run_dir.name}: {nproc} rank(s) {' '.join([*overrides, *flags])}",
              flush=True)
        result = subprocess.run(self.command(run_dir, nproc, list(overrides), list(flags)), cwd=REPO, env=full_env,
                                capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
            raise RuntimeError(f"{run_dir.name} failed ({result.returncode}): {' | '.join(errors) or result.stderr[-3000:]}")
        return result


def losses(run_dir: Path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in read_jsonl(run_dir / "metrics.jsonl")}


def steady(run_dir: Path, key: str, skip: int = 5) -> float | None:
    """Median of a metric after the first `skip` steps (compilation and warm-up); None if never logged (MFU on CPU)."""
    values = [row[key] for row in read_jsonl(run_dir / "metrics.jsonl")[skip:] if row.get(key) is not None]
    return statistics.median(values) if values else None


def max_rel_diff(a: dict[int, float], b: dict[int, float], steps: range) -> float:
    return max(abs(a[s] - b[s]) / abs(b[s]) for s in steps)


def scaling(runner: Runner, work: Path, accum: int) -> dict:
    common = [f"grad_accum_steps={accum}", "max_steps=20", "checkpoint.save_every=0", "checkpoint.save_at_end=false"]
    runner.run(work / "scale_1", 1, common)
    # The one-GPU baseline is the engine's default there (parallel.one_rank: plain); FSDP on one rank, the
    # multi-GPU code path, is measured beside it.
    runner.run(work / "scale_1_fsdp", 1, [*common, "parallel.one_rank=fsdp"])
    runner.run(work / "scale_2_p2p", 2, [*common, 'env.NCCL_P2P_DISABLE="0"'])
    runner.run(work / "scale_2_no_p2p", 2, [*common, 'env.NCCL_P2P_DISABLE="1"'])
    # The lean mode (weights resharded after each forward and backward, gathered again every micro-step): the
    # reference run's memory target is measured here, its cost in tokens/s beside the default.
    runner.run(work / "scale_2_no_p2p_lean", 2, [*common, 'env.NCCL_P2P_DISABLE="1"', "parallel.accumulate_unsharded=false"])
    names = ("scale_1", "scale_1_fsdp", "scale_2_p2p", "scale_2_no_p2p", "scale_2_no_p2p_lean")
    one, one_fsdp, p2p, no_p2p, lean = (steady(work / name, "tokens_per_s") for name in names)

    def peak(name: str) -> float:
        # The trainer logs rank 0's peak; FSDP shards evenly, so it stands for each GPU.
        return round(max(row["memory_gib"] for row in read_jsonl(work / name / "metrics.jsonl")), 2)

    return {
        "tok_s_1gpu": round(one, 1), "tok_s_1gpu_fsdp": round(one_fsdp, 1),
        "tok_s_2gpu": round(p2p, 1), "tok_s_2gpu_no_p2p": round(no_p2p, 1), "tok_s_2gpu_no_p2p_lean": round(lean, 1),
        "scaling_p2p": round(p2p / one, 3), "scaling_no_p2p": round(no_p2p / one, 3),
        "scaling_no_p2p_lean": round(lean / one, 3), "scaling_p2p_vs_1gpu_fsdp": round(p2p / one_fsdp, 3),
        "mfu_per_gpu_1gpu": steady(work / "scale_1", "mfu"), "mfu_per_gpu_2gpu": steady(work / "scale_2_p2p", "mfu"),
        "mfu_per_gpu_2gpu_no_p2p": steady(work / "scale_2_no_p2p", "mfu"),
        "peak_gib_per_gpu_mb1": peak("scale_2_no_p2p_lean"),
        "peak_gib_per_gpu_mb1_accumulate_unsharded": peak("scale_2_no_p2p"),
        "scaling_setup": f"micro-batch {runner.profile['micro_batch']}, accumulation {accum}, 20 steps, "
                         "median tokens/s after step 5; peak_gib_per_gpu_mb1 in the lean mode "
                         "(parallel.accumulate_unsharded=false)",
    }


def collectives(runner: Runner, work: Path) -> dict:
    """FSDP's two collectives alone (bench/collectives.py), with P2P on and off: the link's share of a slow step."""
    results = {}
    for name, p2p_disable in (("p2p", "0"), ("no_p2p", "1")):
        out = work / f"collectives_{name}.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                   str(free_port()), str(REPO / "bench" / "collectives.py"), "--out", str(out),
                   "--megabytes", *map(str, runner.profile["collective_megabytes"])]
        completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                                   env={**os.environ, "NCCL_P2P_DISABLE": p2p_disable})
        if completed.returncode != 0:
            raise RuntimeError(f"collectives ({name}) failed: {completed.stderr[-2000:]}")
        results[f"collectives_{name}"] = json.loads(out.read_text())["rows"]
    return results


def smoke_matrix(runner: Runner, work: Path) -> dict:
    """The reference run's smoke matrix, plus what the reshard and same-batch checks need."""
    # Training only, 100+ steps: the loss must go down.
    runner.run(work / "train_only", 2, ["max_steps=120", "checkpoint.save_every=0", "checkpoint.save_at_end=false"])
    train_only = losses(work / "train_only")
    trained = statistics.mean(train_only[s] for s in range(101, 121)) < statistics.mean(train_only[s] for s in range(1, 21))
    # A 220-step run saving at 150 (stopped at 220 as a crash would stop it), then a new process resuming
    # 150 → 300 with a second save at 300.
    interrupted = work / "interrupted"
    runner.run(interrupted, 2, ["max_steps=300", "checkpoint.save_every=150"], ["--stop-at-step", "220"])
    step_150 = interrupted / "checkpoints" / "step_00000150"
    saved_150 = is_complete(step_150)
    runner.run(interrupted, 2, ["max_steps=300", "checkpoint.save_every=150"], ["--resume", str(step_150)])
    resumed_events = [e for e in read_jsonl(interrupted / "events.jsonl") if e["event"] == "resumed"]
    saved_300 = is_complete(interrupted / "checkpoints" / "step_00000300")
    events = read_jsonl(interrupted / "events.jsonl")
    blocked = [e["seconds"] for e in events if e["event"] == "checkpoint_blocked"]
    staging = [e["seconds"] for e in events if e["event"] == "checkpoint_staging_wait"]
    # Reshard: the 2-GPU checkpoint at 150 on 1 GPU with the same global batch, against the 2-GPU resume.
    resharded = work / "resharded"
    runner.run(resharded, 1, ["max_steps=300", "grad_accum_steps=2", "checkpoint.save_every=0"],
               ["--resume", str(step_150), "--stop-at-step", "170"])
    reshard_diff = max_rel_diff(losses(resharded), losses(interrupted), range(151, 171))
    reshard_event = [e for e in read_jsonl(resharded / "events.jsonl") if e["event"] == "resumed"]
    for run_dir in (interrupted, resharded):  # genesis-1b checkpoints are 11 GiB each
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return {
        "train_only_loss_went_down": trained,
        "smoke_matrix_passed": bool(trained and saved_150 and resumed_events and resumed_events[-1]["step"] == 150
                                    and saved_300),
        "blocked_s_async": round(statistics.median(b + w for b, w in zip(blocked, staging + [0.0] * len(blocked))), 3)
        if blocked else None,
        "blocked_s_async_each": blocked,
        "reshard_2to1_max_rel_diff": reshard_diff,
        "reshard_2to1_ok": bool(reshard_event and reshard_event[0].get("saved_world_size") == 2 and reshard_diff < 1e-2),
    }


def same_global_batch(runner: Runner, work: Path) -> dict:
    common = ["max_steps=50", "checkpoint.save_every=0", "checkpoint.save_at_end=false"]
    runner.run(work / "batch_1gpu", 1, [*common, "grad_accum_steps=2"])
    runner.run(work / "batch_2gpu", 2, [*common, "grad_accum_steps=1"])
    return {"loss_max_rel_diff_1v2": max_rel_diff(losses(work / "batch_2gpu"), losses(work / "batch_1gpu"), range(1, 51))}


def no_hang(runner: Runner, work: Path, timeout_s: int) -> dict:
    common = ["max_steps=12", "checkpoint.save_every=6", "checkpoint.async_save=false", f"parallel.nccl_timeout_s={timeout_s}"]
    short = runner.run(work / "late_rank_short", 2, common, env={"GENESIS_DELAY_SAVE": f"1:{timeout_s / 4}"}, check=False)
    started = time.monotonic()
    long = runner.run(work / "late_rank_long", 2, common, env={"GENESIS_DELAY_SAVE": f"1:{timeout_s * 3}"}, check=False,
                      timeout=timeout_s * 10)
    elapsed = time.monotonic() - started
    error_lines = [line for line in long.stderr.splitlines() if line.startswith("error:")]
    for name in ("late_rank_short", "late_rank_long"):
        shutil.rmtree(work / name / "checkpoints", ignore_errors=True)
    return {
        "late_rank_within_timeout_completed": short.returncode == 0,
        "late_rank_beyond_timeout_exit_code": long.returncode,
        "late_rank_beyond_timeout_wall_s": round(elapsed, 1),
        "late_rank_beyond_timeout_error": error_lines[0] if error_lines else long.stderr[-500:],
        "collective_timeout_s": timeout_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/two_gpu"))
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "two_gpu.json")
    parser.add_argument("--cpu-dry-run", action="store_true", help="tiny model, 2 gloo ranks on CPU")
    section_names = ["collectives", "scaling", "smoke", "batch", "hang"]
    parser.add_argument("--only", nargs="+", default=section_names, choices=section_names)
    parser.add_argument("--update", action="store_true",
                        help="keep the figures already in --out and replace only those of the sections run now "
                             "(to split the matrix over several shorter jobs)")
    args = parser.parse_args()

    profile = PROFILES["cpu" if args.cpu_dry_run else "gpu"]
    shutil.rmtree(args.workdir, ignore_errors=True)
    data_dir = args.workdir / "data"
    make_learnable_data(data_dir, profile["vocab_size"])
    runner = Runner(profile, data_dir)
    previous = json.loads(args.out.read_text()) if args.update and args.out.exists() else {}
    results: dict = {**previous, **environment(), "profile": "cpu-dry-run" if args.cpu_dry_run else "gpu"}
    if not args.cpu_dry_run:
        import torch

        results["gpus"] = f"{torch.cuda.device_count()}× {torch.cuda.get_device_name(0)}"
    sections = {"collectives": lambda: collectives(runner, args.workdir),
                "scaling": lambda: scaling(runner, args.workdir, profile["scaling_accum"]),
                "smoke": lambda: smoke_matrix(runner, args.workdir),
                "batch": lambda: same_global_batch(runner, args.workdir),
                "hang": lambda: no_hang(runner, args.workdir, profile["timeout_s"])}
    for name in args.only:
        started = time.monotonic()
        results.pop(f"{name}_error", None)  # an --update that now succeeds clears an earlier failure
        try:
            results |= sections[name]()
        except Exception as err:  # a failed section is a result too; the others still run
            results[f"{name}_error"] = f"{type(err).__name__}: {str(err)[-1500:]}"
        results[f"{name}_s"] = round(time.monotonic() - started, 1)
        results[f"{name}_finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        write_json(args.out, results)
        print(json.dumps({k: v for k, v in results.items() if not isinstance(v, list)}, indent=1), flush=True)


if __name__ == "__main__":
    main()
