"""The micro-step modes on one GPU: what a micro-step costs as a plain rank, through FSDP's units, and on a
replica beside FSDP's shards (`parallel.micro_steps: replica`, #27 item 3), at the reference run's micro-batch 1.

On one rank FSDP's collectives move nothing, so this measures what each mode adds to a micro-step on the GPU
and the host (hooks, launches, the replica's gather, fold and reduce), not the link. The two-GPU scaling is
bench/two_gpu.py's (`--only scaling --scaling-setups 1x64:8 --variant-overrides parallel.micro_steps=replica`);
this is the check a machine of one GPU allows: the replica's CUDA path runs, compiles as one graph, trains the
same losses as FSDP's, and costs its micro-steps what a plain rank's cost.

    python bench/micro_steps.py --workdir /tmp/micro_steps --accum 16 --steps 8
    python bench/micro_steps.py --cpu-dry-run --workdir /tmp/micro_steps_cpu --out /tmp/micro_steps_cpu.json

Every mode runs `torchrun -m genesis_model.train` (one process each, one after another) with two_gpu.py's
profile: configs/train/genesis-1b-2x4090.yaml on synthetic counting shards, no checkpoints. Tokens/s is the
median after the first quarter of the steps (compile and warm-up). The run is appended to --out
(bench.common.append_run) with its command, GPU, torch version and git revision.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import append_run, command_line, environment, git_rev  # noqa: E402
from bench.two_gpu import (NO_CHECKPOINTS, PROFILES, Runner, losses, make_learnable_data, max_rel_diff,  # noqa: E402
                           steady)

# Mode name -> the trainer overrides that select it on one rank.
MODES = {
    "plain": ["parallel.one_rank=plain"],
    "fsdp": ["parallel.one_rank=fsdp", "parallel.micro_steps=fsdp"],
    "replica": ["parallel.one_rank=fsdp", "parallel.micro_steps=replica"],
}


def measure(runner: Runner, work: Path, micro_batch: int, accum: int, steps: int, modes: list[str]) -> dict:
    """Each mode's tokens/s, peak memory and losses; the replica's and plain's losses against FSDP's."""
    skip = max(2, steps // 4)
    common = [f"micro_batch_size={micro_batch}", f"grad_accum_steps={accum}", f"max_steps={steps}",
              "parallel.master_weights=false", *NO_CHECKPOINTS]
    figures: dict = {"micro_batch": micro_batch, "accum": accum, "steps": steps, "median_after_step": skip}
    curves = {}
    for mode in modes:
        run_dir = work / f"mode_{mode}"
        try:
            runner.run(run_dir, 1, [*common, *MODES[mode]])
        except RuntimeError as err:  # a mode that fails is a result; the others still run
            figures[f"error_{mode}"] = str(err)[-1500:]
            continue
        figures[f"tok_s_{mode}"] = round(steady(run_dir, "tokens_per_s", skip), 1)
        figures[f"peak_gib_{mode}"] = round(steady(run_dir, "memory_gib", skip), 2)
        curves[mode] = losses(run_dir)
    figures["loss"] = {mode: [[step, round(loss, 5)] for step, loss in sorted(curve.items())]
                       for mode, curve in curves.items()}
    if "fsdp" in curves:
        for mode in ("plain", "replica"):
            if mode in curves and f"tok_s_{mode}" in figures:
                shared = sorted(set(curves[mode]) & set(curves["fsdp"]))
                figures[f"max_rel_loss_diff_{mode}_vs_fsdp"] = round(max_rel_diff(curves[mode], curves["fsdp"],
                                                                                  shared), 5)
                figures[f"tok_s_{mode}_vs_fsdp"] = round(figures[f"tok_s_{mode}"] / figures["tok_s_fsdp"], 3)
    if "tok_s_plain" in figures and "tok_s_replica" in figures:
        figures["tok_s_replica_vs_plain"] = round(figures["tok_s_replica"] / figures["tok_s_plain"], 3)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/micro_steps"))
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "micro_steps.json")
    parser.add_argument("--cpu-dry-run", action="store_true", help="tiny model on the CPU (the script's own check)")
    parser.add_argument("--micro-batch", type=int, default=None, help="default: the profile's (1 on a GPU)")
    parser.add_argument("--accum", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    args = parser.parse_args(argv)

    profile = PROFILES["cpu" if args.cpu_dry_run else "gpu"]
    if not args.cpu_dry_run:
        import torch

        if not torch.cuda.is_available():
            print("error: no CUDA device here; run on a GPU, or pass --cpu-dry-run to check the script",
                  file=sys.stderr)
            return 2
    shutil.rmtree(args.workdir, ignore_errors=True)
    data_dir = args.workdir / "data"
    make_learnable_data(data_dir, profile["vocab_size"])
    runner = Runner(profile, data_dir)
    figures = measure(runner, args.workdir, args.micro_batch or profile["micro_batch"], args.accum, args.steps,
                      args.modes)
    run = {**environment(), "command": command_line("micro_steps.py", argv), "git_rev": git_rev(),
           "profile": "cpu-dry-run" if args.cpu_dry_run else "gpu", **figures}
    latest = {key: value for key, value in run.items() if key != "loss"}
    append_run(args.out, run, latest, whole_top=True)
    print({key: value for key, value in latest.items() if not isinstance(value, dict)}, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
