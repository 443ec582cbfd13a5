"""Where does a genesis-1b training step spend its time? Times the forward, backward and optimizer phases with
CUDA events, then profiles a few steps and reports the GPU's busy and idle time and the top kernels.

    python bench/profile_step.py --micro-batch 1 [--master-weights] [--compile-scope model] --out profile.json
    python bench/profile_step.py --micro-batch 16 --float8 tensorwise --out fp8_profile.json   # FP8's step

A phase's time is the GPU time between the events around it (kernels plus any idle gaps), from steps run
without the profiler, so the profiler's own overhead is not in it.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import append_run, command_line, environment, git_rev  # noqa: E402
from bench.train_step import build_genesis  # noqa: E402
from genesis.config import load_model_config  # noqa: E402
from genesis_model.profiling import summarize_trace  # noqa: E402


def time_phases(step, batch, steps: int) -> dict[str, float]:
    """Mean milliseconds per phase over `steps` steps, measured between CUDA events (no host syncs inside)."""
    marks: list[tuple[str, torch.cuda.Event]] = []

    def mark(phase: str) -> None:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        marks.append((phase, event))

    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        mark("start")
        step(batch[:, :-1], batch[:, 1:], mark)
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - start) * 1000 / steps
    totals: dict[str, float] = {}
    for (_, begin), (phase, end) in zip(marks, marks[1:]):
        if phase != "start":
            totals[phase] = totals.get(phase, 0.0) + begin.elapsed_time(end)
    return {"wall_ms_per_step": round(wall_ms, 2), **{f"{phase}_ms": round(ms / steps, 2) for phase, ms in totals.items()}}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="genesis-1b")
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--one-rank", default="plain", choices=["plain", "fsdp"])
    parser.add_argument("--compile-scope", default="blocks", choices=["blocks", "model"])
    parser.add_argument("--master-weights", action="store_true")
    parser.add_argument("--float8", default="off", choices=["off", "rowwise", "tensorwise"],
                        help="parallel.float8: where FP8's scaling and casts go in the step (#27 item 1)")
    parser.add_argument("--steps", type=int, default=3, help="profiled steps")
    parser.add_argument("--trace", type=Path, default=None, help="also write the Chrome trace here")
    parser.add_argument("--out", type=Path, default=None,
                        help="append the phase times and trace summary to this JSON file's runs")
    args = parser.parse_args()
    config = load_model_config(args.model)
    model, step = build_genesis(config, "none", True, one_rank=args.one_rank, compile_scope=args.compile_scope,
                                master_weights=args.master_weights, float8=args.float8)
    batch = torch.randint(0, config.vocab_size, (args.micro_batch, config.max_seq_len + 1), device="cuda")
    for _ in range(4):
        step(batch[:, :-1], batch[:, 1:])
    phases = time_phases(step, batch, steps=10)
    print(f"mb {args.micro_batch}: {phases}", flush=True)

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.steps):
            step(batch[:, :-1], batch[:, 1:])
        torch.cuda.synchronize()
        wall_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        trace_path = Path(args.trace or Path(tmp) / "trace.json")
        prof.export_chrome_trace(str(trace_path))
        summary = summarize_trace(json.loads(trace_path.read_text()), wall_s, args.steps)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=90))
    print(json.dumps(summary, indent=1))
    if args.out:
        result = {**environment(), "command": command_line("profile_step.py"), "git_rev": git_rev(),
                  "micro_batch": args.micro_batch, "one_rank": args.one_rank,
                  "compile_scope": args.compile_scope, "master_weights": args.master_weights, "float8": args.float8,
                  "phases_unprofiled": phases, "profiled": summary}
        append_run(args.out, result, {})


if __name__ == "__main__":
    main()
