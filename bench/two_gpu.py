"""Genesis on two GPUs of one host: scaling, PCIe mode, the NCCL smoke matrix, resharding, memory, no hang.

Every figure comes from the real entry point (`torchrun -m genesis_model.train`) on synthetic token shards,
with configs/train/genesis-1b-2x4090.yaml (the reference run's settings) and a few overrides:

0. collectives: all-gather and reduce-scatter bandwidth at FSDP's sizes, P2P on and off (bench/collectives.py);
1. scaling: tokens/s on 1 GPU and on 2 GPUs at the same micro-batch and accumulation, with NCCL peer-to-peer
   on and with `NCCL_P2P_DISABLE=1` (the reference run's PCIe setting); MFU per GPU; for several setups (micro-
   batch 4 × accumulation 16 first, the top-level figures; then the reference run's micro-batch 1 ×
   accumulation 64, whose newest row gives `scaling_mb1_p2p` and `scaling_mb1_no_p2p`, #27 item 3), the short
   ones profiled (where the step's time went); a setup measured again keeps its earlier runs;
2. the smoke matrix on NCCL with DCP checkpoints: 100+ steps of training only; a 220-step run saving at 150;
   a new process resuming 150 → 300 with a second save at 300; async checkpoint blocking time;
3. the same global batch on 1 GPU (accumulation 2) and on 2 GPUs (accumulation 1): the largest relative loss
   difference over 50 steps;
4. reshard: the 2-GPU checkpoint at 150 resumed on 1 GPU, against the 2-GPU run over steps 151–170 (in the
   smoke section, and alone as the reshard section);
5. memory: peak GiB per GPU at micro-batch 1 with 2-way FSDP;
6. no hang: a rank that arrives late at a checkpoint (`GENESIS_DELAY_SAVE`) within the collective timeout
   completes; one later than the timeout ends the job with a one-line error within the timeout plus a margin.

    python bench/two_gpu.py --workdir /tmp/two_gpu --out bench/results/two_gpu.json
    python bench/two_gpu.py --cpu-dry-run --workdir /tmp/two_gpu_cpu --out /tmp/two_gpu_cpu.json
    python bench/two_gpu.py --only smoke --update   # one section at a time, keeping the others' figures
    python bench/two_gpu.py --only scaling --scaling-setups 4x2:20 --update   # one more setup
    python bench/two_gpu.py --only scaling --scaling-setups 1x8:16 --variant-overrides parallel.fsdp_unit_blocks=5 --update
    python bench/two_gpu.py --only scaling --scaling-setups 1x64:8 --update
        --variant-overrides parallel.micro_steps=replica   # (one line) micro-steps on a replica, #27 item 3

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
from genesis_model.launch import torchrun_command as torchrun  # noqa: E402
from genesis.run_dir import MetricsReader, RunDir, is_complete  # noqa: E402

PROFILES = {
    "gpu": {
        "config": REPO / "configs" / "train" / "genesis-1b-2x4090.yaml",
        "vocab_size": 49_152,
        "micro_batch": 1,
        # NOTE: accumulation 1 outside the scaling runs (the config's 64 would make the 300-step smoke matrix
        # 40M tokens), and the reshard check's 1-GPU run doubles it to keep the global batch.
        # optimizer.cooldown=inline: no milestones here, so the config's wsd trunk decays into max_steps.
        "overrides": ["grad_accum_steps=1", "eval.every=0", "log_every=1", "verify_data_checksums=false",
                      "checkpoint.milestone_every=0", "optimizer.cooldown=inline", "checkpoint.keep_last=3"],
        # The headline setup (HEADLINE_SETUP), then the reference run's micro-batch 1 × accumulation 64, then
        # accumulation 8 (profiled: where a slow step's time went).
        "scaling_setups": ["4x16:6", "1x64:8", "1x8:14"],
        "profile_step": 10,
        "collective_megabytes": [100, 1000],
        "timeout_s": 60,
    },
    "cpu": {
        "config": REPO / "configs" / "train" / "tiny-cpu.yaml",
        "vocab_size": 4096,
        "micro_batch": 2,
        "overrides": ["seq_len=64", "eval.every=0", "log_every=1", "verify_data_checksums=false",
                      "checkpoint.milestone_every=0", "checkpoint.keep_last=3"],
        "scaling_setups": ["2x4:6", "2x1:6"],
        "profile_step": 3,
        "collective_megabytes": [4],
        "timeout_s": 20,
    },
}


# Overrides for runs that measure training only: no checkpoint written (genesis-1b's are 11 GiB each).
NO_CHECKPOINTS = ["checkpoint.save_every=0", "checkpoint.save_at_end=false"]
# The top-level figures: micro-batch 4 × accumulation 16 is the reference run's 262,144 tokens per optimizer step on
# 2 GPUs, at a micro-batch an H100 or H200 holds.
# NOTE: not the reference run's micro-batch 1 (what a 24 GB card holds): there each micro-step is ~30 ms of GPU work
# behind ~1,000 kernel launches and FSDP's hooks, so tokens/s follows the host CPU more than the GPUs or the link.
# Two x2 hosts on 2026-11-30 measured 1.47x and 1.77x at micro-batch 1 with the same code; those rows stay in
# scaling_setups, with their profiles.
HEADLINE_SETUP = (4, 16)
# The reference run's configuration on a 24 GB card: micro-batch 1 × accumulation 64 (#27 item 3).
REFERENCE_MB1_SETUP = (1, 64)


def read_metrics(run_dir: Path) -> list[dict]:
    return MetricsReader(RunDir(run_dir).metrics).all_rows()


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
        return torchrun(nproc, "-m", "genesis_model.train", "--config", str(self.profile["config"]),
                        f"data_dir={self.data_dir}", f"run_dir={run_dir}", f"micro_batch_size={self.profile['micro_batch']}",
                        *self.profile["overrides"], *overrides, *flags)

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
    return {row["step"]: row["loss"] for row in read_metrics(run_dir)}


def steady(run_dir: Path, key: str, skip: int = 5) -> float | None:
    """Median of a metric after the first `skip` steps (compilation and warm-up); None if never logged (MFU on CPU)."""
    values = [row[key] for row in read_metrics(run_dir)[skip:] if row.get(key) is not None]
    return statistics.median(values) if values else None


def max_rel_diff(a: dict[int, float], b: dict[int, float], steps: range) -> float:
    return max(abs(a[s] - b[s]) / abs(b[s]) for s in steps)


# What a repeated scaling setup keeps of each earlier run.
REPEAT_KEYS = ("measured", "steps", "tok_s_1gpu", "tok_s_2gpu", "tok_s_2gpu_no_p2p", "scaling_p2p", "scaling_no_p2p",
               "profile_1gpu", "profile_2gpu")


def parse_setup(text: str) -> tuple[int, int, int]:
    """'MBxACCUM:STEPS', e.g. '1x64:8' = micro-batch 1, accumulation 64, 8 optimizer steps."""
    shape, _, steps = text.partition(":")
    micro_batch, _, accum = shape.partition("x")
    return int(micro_batch), int(accum), int(steps or 20)


def scaling(runner: Runner, work: Path, setups: list[str], profile_step: int, previous_rows: list[dict],
            variant_overrides: list[str] = ()) -> dict:
    """Tokens/s on 1 GPU and on 2 (P2P on and off) for each micro-batch × accumulation setup, merged with the
    rows of earlier --update calls by setup and variant (`variant_overrides`, extra trainer overrides such as
    parallel.fsdp_unit_blocks=5; none = "default"). The top-level figures are the default variant at
    HEADLINE_SETUP when measured, else the first setup; a setup measured again keeps its earlier runs'
    figures (`earlier_runs`). With `profile_step`, the 1- and 2-GPU P2P runs are profiled there for 2 steps
    (genesis_model/profiling.py), so each slow case comes with where its time went."""
    variant = " ".join(variant_overrides) or "default"
    rows = {(row["micro_batch"], row["accum"], row.get("variant", "default")): row for row in previous_rows}
    for text in setups:
        micro_batch, accum, steps = parse_setup(text)
        skip = max(2, steps // 4)  # compilation and warm-up
        common = [f"micro_batch_size={micro_batch}", f"grad_accum_steps={accum}", f"max_steps={steps}",
                  *NO_CHECKPOINTS, *variant_overrides]
        # NOTE: only short accumulations are profiled: two steps of 64 micro-steps make a trace of gigabytes.
        profiled = ([f"profiling.start_step={min(profile_step, steps - 1)}", "profiling.trace=false"]
                    if profile_step and accum <= 8 else [])
        # The one-GPU baseline is the engine's default there (parallel.one_rank: plain).
        names = {"1gpu": (1, [*common, *profiled]), "2gpu": (2, [*common, *profiled, 'env.NCCL_P2P_DISABLE="0"']),
                 "2gpu_no_p2p": (2, [*common, 'env.NCCL_P2P_DISABLE="1"'])}
        row = {"micro_batch": micro_batch, "accum": accum, "variant": variant, "steps": steps,
               "median_after_step": skip, "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        for name, (nproc, overrides) in names.items():
            run_dir = work / f"scale_mb{micro_batch}x{accum}_{name}"
            runner.run(run_dir, nproc, overrides)
            row[f"tok_s_{name}"] = round(steady(run_dir, "tokens_per_s", skip), 1)
            row[f"mfu_per_gpu_{name}"] = steady(run_dir, "mfu", skip)
            for summary in sorted((run_dir / "profile").glob("rank*.summary.json")):
                row.setdefault(f"profile_{name}", []).append(json.loads(summary.read_text()))
        row["scaling_p2p"] = round(row["tok_s_2gpu"] / row["tok_s_1gpu"], 3)
        row["scaling_no_p2p"] = round(row["tok_s_2gpu_no_p2p"] / row["tok_s_1gpu"], 3)
        # NOTE: a setup measured again keeps its earlier runs' figures: at micro-batch 1 the step is bound by the
        # host's CPU, and one run alone says little about another host's.
        earlier = rows.get((micro_batch, accum, variant))
        if earlier:
            row["earlier_runs"] = [*earlier.pop("earlier_runs", []),
                                   {key: earlier.get(key) for key in REPEAT_KEYS if key in earlier}]
        rows[(micro_batch, accum, variant)] = row
    return scaling_figures(rows, first_now=rows[(*parse_setup(setups[0])[:2], variant)])


def scaling_figures(rows: dict[tuple[int, int, str], dict], first_now: dict) -> dict:
    """The scaling section's record from every row measured (by micro-batch, accumulation and variant):
    - the top-level figures: the default variant at HEADLINE_SETUP when measured, else the first setup of this
      call (a variant never replaces them while a default row exists);
    - `scaling_mb1_p2p` / `scaling_mb1_no_p2p` (#27 item 3): the reference run's micro-batch 1 × accumulation 64,
      from the newest row of that setup, whichever variant it was (`scaling_mb1_variant`): each row's 1- and
      2-GPU runs come from one call."""
    defaults = [row for key, row in rows.items() if key[2] == "default"]
    fallback = first_now if first_now.get("variant", "default") == "default" or not defaults else defaults[0]
    top = rows.get((*HEADLINE_SETUP, "default"), fallback)
    record = {
        **{key: top[key] for key in ("tok_s_1gpu", "tok_s_2gpu", "tok_s_2gpu_no_p2p", "scaling_p2p", "scaling_no_p2p",
                                     "mfu_per_gpu_1gpu", "mfu_per_gpu_2gpu", "mfu_per_gpu_2gpu_no_p2p")},
        "scaling_setups": sorted(rows.values(), key=lambda row: (row["micro_batch"], -row["accum"],
                                                                 row.get("variant", "default"))),
        "scaling_setup": f"top-level figures: {top.get('variant', 'default')} variant, micro-batch "
                         f"{top['micro_batch']}, accumulation {top['accum']}, "
                         f"{top['steps']} steps, median tokens/s after step {top['median_after_step']}; "
                         "scaling_setups has every setup measured",
    }
    reference = [row for (micro_batch, accum, _), row in rows.items() if (micro_batch, accum) == REFERENCE_MB1_SETUP]
    if reference:
        newest = max(reference, key=lambda row: row.get("measured", ""))
        record |= {"scaling_mb1_p2p": newest["scaling_p2p"], "scaling_mb1_no_p2p": newest["scaling_no_p2p"],
                   "scaling_mb1_variant": newest.get("variant", "default"),
                   "scaling_mb1_measured": newest.get("measured")}
    return record


def memory(runner: Runner, work: Path) -> dict:
    """Peak memory per GPU at micro-batch 1 with 2-way FSDP, in the lean mode (weights resharded after each
    forward and backward, gathered again every micro-step) and the default (kept gathered through accumulation).
    The trainer logs the largest peak over ranks."""
    results = {}
    for name, extra in (("lean", ["parallel.accumulate_unsharded=false"]), ("default", [])):
        run_dir = work / f"memory_{name}"
        runner.run(run_dir, 2, ["micro_batch_size=1", "grad_accum_steps=8", "max_steps=8", *NO_CHECKPOINTS,
                                'env.NCCL_P2P_DISABLE="1"', *extra])
        results[name] = round(max(row["memory_gib"] for row in read_metrics(run_dir)), 2)
        results[f"tok_s_{name}"] = round(steady(run_dir, "tokens_per_s", 3), 1)
    return {"peak_gib_per_gpu_mb1": results["lean"], "peak_gib_per_gpu_mb1_accumulate_unsharded": results["default"],
            "tok_s_2gpu_no_p2p_lean": results["tok_s_lean"],
            "memory_setup": "micro-batch 1, accumulation 8, NCCL_P2P_DISABLE=1, 8 steps; peak_gib_per_gpu_mb1 is "
                            "the lean mode (parallel.accumulate_unsharded=false)"}


def collectives(runner: Runner, work: Path) -> dict:
    """FSDP's two collectives alone (bench/collectives.py), with P2P on and off: the link's share of a slow step."""
    results = {}
    for name, p2p_disable in (("p2p", "0"), ("no_p2p", "1")):
        out = work / f"collectives_{name}.json"
        command = torchrun(2, str(REPO / "bench" / "collectives.py"), "--out", str(out),
                           "--megabytes", *map(str, runner.profile["collective_megabytes"]))
        completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                                   env={**os.environ, "NCCL_P2P_DISABLE": p2p_disable})
        if completed.returncode != 0:
            raise RuntimeError(f"collectives ({name}) failed: {completed.stderr[-2000:]}")
        results[f"collectives_{name}"] = json.loads(out.read_text())["rows"]
    return results


def smoke_matrix(runner: Runner, work: Path) -> dict:
    """The reference run's smoke matrix, plus what the reshard and same-batch checks need."""
    # Training only, 100+ steps: the loss must go down.
    runner.run(work / "train_only", 2, ["max_steps=120", *NO_CHECKPOINTS])
    train_only = losses(work / "train_only")
    trained = statistics.mean(train_only[s] for s in range(101, 121)) < statistics.mean(train_only[s] for s in range(1, 21))
    # A 220-step run saving at 150 (stopped at 220 as a crash would stop it), then a new process resuming
    # 150 → 300 with a second save at 300.
    interrupted = work / "interrupted"
    runner.run(interrupted, 2, ["max_steps=300", "checkpoint.save_every=150"], ["--stop-at-step", "220"])
    step_150 = interrupted / "checkpoints" / "step_00000150"
    saved_150 = is_complete(step_150)
    runner.run(interrupted, 2, ["max_steps=300", "checkpoint.save_every=150"], ["--resume", str(step_150)])
    resumed_events = [e for e in read_jsonl(RunDir(interrupted).events) if e["event"] == "resumed"]
    saved_300 = is_complete(interrupted / "checkpoints" / "step_00000300")
    events = read_jsonl(RunDir(interrupted).events)
    blocked = [e["seconds"] for e in events if e["event"] == "checkpoint_blocked"]
    staging = [e["seconds"] for e in events if e["event"] == "checkpoint_staging_wait"]
    # Reshard: the 2-GPU checkpoint at 150 on 1 GPU with the same global batch, against the 2-GPU resume.
    resharded = resume_on_one_gpu(runner, step_150, work / "resharded", interrupted, ["max_steps=300"])
    for run_dir in (interrupted, work / "resharded"):  # genesis-1b checkpoints are 11 GiB each
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return {
        "train_only_loss_went_down": trained,
        "smoke_matrix_passed": bool(trained and saved_150 and resumed_events and resumed_events[-1]["step"] == 150
                                    and saved_300),
        "blocked_s_async": round(statistics.median(b + w for b, w in zip(blocked, staging + [0.0] * len(blocked))), 3)
        if blocked else None,
        "blocked_s_async_each": blocked,
        **resharded,
    }


def resume_on_one_gpu(runner: Runner, checkpoint: Path, run_dir: Path, two_gpu_run: Path, overrides: list[str]) -> dict:
    """Resume a 2-GPU checkpoint on 1 GPU (accumulation doubled: the same global batch) to step 170 and compare
    its losses with the 2-GPU run's over the same steps."""
    start = int(checkpoint.name.split("_")[-1])
    runner.run(run_dir, 1, [*overrides, "grad_accum_steps=2", *NO_CHECKPOINTS],
               ["--resume", str(checkpoint), "--stop-at-step", "170"])
    diff = max_rel_diff(losses(run_dir), losses(two_gpu_run), range(start + 1, 171))
    event = [e for e in read_jsonl(RunDir(run_dir).events) if e["event"] == "resumed"]
    return {"reshard_2to1_max_rel_diff": diff,
            "reshard_2to1_ok": bool(event and event[0].get("saved_world_size") == 2 and diff < 1e-2)}


def reshard(runner: Runner, work: Path) -> dict:
    """The smoke matrix's reshard check alone: 2 GPUs 0 → 170 saving at 150, then 150 → 170 on 1 GPU."""
    two_gpu = work / "reshard_2gpu"
    common = ["max_steps=170", "checkpoint.save_every=150", "checkpoint.save_at_end=false"]
    runner.run(two_gpu, 2, common)
    result = resume_on_one_gpu(runner, two_gpu / "checkpoints" / "step_00000150", work / "reshard_1gpu", two_gpu,
                               ["max_steps=170"])
    for run_dir in (two_gpu, work / "reshard_1gpu"):
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return result


def same_global_batch(runner: Runner, work: Path) -> dict:
    common = ["max_steps=50", *NO_CHECKPOINTS]
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
    section_names = ["collectives", "scaling", "memory", "smoke", "reshard", "batch", "hang"]
    parser.add_argument("--only", nargs="+", default=section_names, choices=section_names)
    parser.add_argument("--scaling-setups", nargs="+", default=None, metavar="MBxACCUM:STEPS",
                        help="override the profile's scaling setups, e.g. 1x64:8 1x8:20 (the top-level figures come "
                             "from HEADLINE_SETUP's default row when there is one, else from the first)")
    parser.add_argument("--variant-overrides", nargs="+", default=[], metavar="KEY=VALUE",
                        help="extra trainer overrides for the scaling runs (e.g. parallel.fsdp_unit_blocks=5); their "
                             "rows are kept beside the default's")
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
                "scaling": lambda: scaling(runner, args.workdir, args.scaling_setups or profile["scaling_setups"],
                                           profile["profile_step"], previous.get("scaling_setups", []),
                                           args.variant_overrides),
                "memory": lambda: memory(runner, args.workdir),
                "smoke": lambda: smoke_matrix(runner, args.workdir),
                "reshard": lambda: reshard(runner, args.workdir),
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
