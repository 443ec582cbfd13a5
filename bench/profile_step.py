"""Where does a genesis-1b training step spend its time? Profiles a few steps and prints the top kernels.

    python bench/profile_step.py --micro-batch 1
"""

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.train_step import build_genesis  # noqa: E402
from genesis.config import load_model_config  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="genesis-1b")
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--one-rank", default="plain", choices=["plain", "fsdp"])
    parser.add_argument("--compile-scope", default="blocks", choices=["blocks", "model"])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    config = load_model_config(args.model)
    model, step = build_genesis(config, "none", True, one_rank=args.one_rank, compile_scope=args.compile_scope)
    batch = torch.randint(0, config.vocab_size, (args.micro_batch, config.max_seq_len + 1), device="cuda")
    for _ in range(4):
        step(batch[:, :-1], batch[:, 1:])
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(3):
            step(batch[:, :-1], batch[:, 1:])
        torch.cuda.synchronize()
        wall = (time.perf_counter() - start) / 3
    print(f"mb {args.micro_batch}: wall {wall * 1000:.1f} ms/step")
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70)
    print(table)
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=15, max_name_column_width=70))
    if args.out:
        prof.export_chrome_trace(str(args.out))


if __name__ == "__main__":
    main()
