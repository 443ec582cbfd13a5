"""All-gather and reduce-scatter bandwidth between the ranks of one host, at the sizes FSDP moves for genesis-1b.

FSDP2 all-gathers each block's bf16 weights (about 50M parameters: 100 MB gathered) and reduce-scatters its fp32
gradients (200 MB) once per optimizer step when the weights stay gathered through accumulation. This measures
those two collectives alone, so a slow multi-GPU step can be split into "the link is slow" and "the overlap
is poor". Bandwidths follow nccl-tests' conventions: algbw = bytes of the full tensor / time; busbw = algbw ×
(n − 1) / n, comparable with the link's rated bandwidth.

    torchrun --nproc_per_node 2 bench/collectives.py --out /tmp/collectives.json
    NCCL_P2P_DISABLE=1 torchrun --nproc_per_node 2 bench/collectives.py --out /tmp/collectives_no_p2p.json

On CPU (gloo) it runs with small tensors as the script's own check: `--megabytes 4`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import environment, write_json  # noqa: E402


def timed(fn, device: torch.device, warmup: int, iterations: int) -> float:
    """Seconds per call, the median over `iterations` after `warmup` calls, as the slowest rank saw it."""
    for _ in range(warmup):
        fn()
    seconds = []
    for _ in range(iterations):
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - started)
    median = torch.tensor(sorted(seconds)[len(seconds) // 2], dtype=torch.float64,
                          device=device if device.type == "cuda" else "cpu")
    dist.all_reduce(median, op=dist.ReduceOp.MAX)
    return float(median)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=float, nargs="+", default=[100.0, 1000.0],
                        help="size of the gathered bf16 tensor; the fp32 reduce-scatter input is twice as large")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    world_size = dist.get_world_size()
    rows = []
    for megabytes in args.megabytes:
        gathered_elems = int(megabytes * 1e6 / 2) // world_size * world_size
        shard = torch.randn(gathered_elems // world_size, dtype=torch.bfloat16, device=device)
        gathered = torch.empty(gathered_elems, dtype=torch.bfloat16, device=device)
        grads = torch.randn(gathered_elems, dtype=torch.float32, device=device)
        reduced = torch.empty(gathered_elems // world_size, dtype=torch.float32, device=device)
        for name, fn, full_bytes in (
            ("all_gather_bf16", lambda: dist.all_gather_into_tensor(gathered, shard), gathered.nbytes),
            ("reduce_scatter_fp32", lambda: dist.reduce_scatter_tensor(reduced, grads), grads.nbytes),
        ):
            seconds = timed(fn, device, args.warmup, args.iterations)
            algbw = full_bytes / seconds / 1e9
            rows.append({"collective": name, "bytes": full_bytes, "ms": round(seconds * 1e3, 3),
                         "algbw_gbs": round(algbw, 2), "busbw_gbs": round(algbw * (world_size - 1) / world_size, 2)})
    if dist.get_rank() == 0:
        result = {**environment(), "world_size": world_size, "backend": dist.get_backend(),
                  "nccl_p2p_disable": os.environ.get("NCCL_P2P_DISABLE"), "rows": rows}
        write_json(args.out, result)
        print(json.dumps(result, indent=1), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
