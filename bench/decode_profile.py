"""Where genesis-1b's batch-1 decode step spends its time on one GPU (#27 item 2): a diagnosis, not a figure.

The step is compiled as `genesis serve` compiles it, but without CUDA graphs (mode "default") so that the
profiler sees each kernel; its kernels are summed by name over many steps. Beside that, the same step captured
as a CUDA graph (mode "reduce-overhead", as decoding runs) is replayed back to back and timed: the graph's time
per step minus the kernels' own time is what the gaps between kernels cost. Kernels are grouped by what they
are (cuBLAS matrix-vector products, attention, Inductor's fused Triton kernels, copies) with their share of the
step and, for the matrix products, the bandwidth they reach on the bytes the weights take.

    python bench/decode_profile.py --out bench/results/decode_profile.json      # appended to its runs
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.common import append_run, environment, git_rev  # noqa: E402
from genesis.config import load_model_config  # noqa: E402
from genesis_model.generate import Generator  # noqa: E402
from genesis_model.model import Transformer  # noqa: E402

CACHE_LEN, PROMPT_TOKENS, STEPS = 384, 128, 50


def kind_of(name: str) -> str:
    lowered = name.lower()
    if "_gemv_kernel" in lowered:  # genesis_model.decode_kernels's, before cuBLAS's gemv kernels
        return "matmul (Triton GEMV)"
    if "one_token_attention" in lowered:
        return "attention"
    if "gemv" in lowered or "gemm" in lowered or "xmma" in lowered or "cutlass" in lowered or "sm90" in lowered:
        return "matmul (cuBLAS)"
    if "cudnn" in lowered and "sdpa" in lowered:
        return "attention"
    if "flash" in lowered or "fmha" in lowered or "attention" in lowered or "efficient" in lowered:
        return "attention"
    if lowered.startswith("triton"):
        return "fused (Inductor/Triton)"
    if "copy" in lowered or "index" in lowered or "memcpy" in lowered or "memset" in lowered:
        return "copy/index"
    return "other"


@contextmanager
def warm_decode_step(model: Transformer, mode: str):
    """The batch-1 decode step compiled in `mode`, warmed up (compiled, captured), as a no-argument call run
    under inference mode; the cache and compiled graphs are dropped after."""
    generator = Generator(model, max_seq_len=CACHE_LEN, compile_decode=True, compile_mode=mode)
    token = torch.full((1, 1), 5, dtype=torch.long, device="cuda")
    position = torch.tensor([PROMPT_TOKENS], device="cuda")
    try:
        with torch.inference_mode():
            for _ in range(5):
                generator._decode(token, position)
            torch.cuda.synchronize()
            yield lambda: generator._decode(token, position)
    finally:
        model.clear_kv_cache()
        torch._dynamo.reset()


def profile_step(model: Transformer) -> dict:
    with warm_decode_step(model, "default") as step:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(STEPS):
                step()
            torch.cuda.synchronize()
    kernels: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kernels[event.name][0] += 1
            kernels[event.name][1] += event.device_time_total
    rows = sorted(({"kernel": name[:160], "kind": kind_of(name), "per_step": count / STEPS,
                    "us_per_step": round(total / STEPS, 2)} for name, (count, total) in kernels.items()),
                  key=lambda row: -row["us_per_step"])
    by_kind: dict[str, dict] = defaultdict(lambda: {"kernels_per_step": 0.0, "us_per_step": 0.0})
    for row in rows:
        by_kind[row["kind"]]["kernels_per_step"] += row["per_step"]
        by_kind[row["kind"]]["us_per_step"] = round(by_kind[row["kind"]]["us_per_step"] + row["us_per_step"], 2)
    return {"kernels_per_step": sum(r["per_step"] for r in rows),
            "kernel_us_per_step": round(sum(r["us_per_step"] for r in rows), 1),
            "by_kind": dict(by_kind), "top_kernels": rows[:30]}


def graph_step_us(model: Transformer, replays: int = 200) -> float:
    with warm_decode_step(model, "reduce-overhead") as step:
        start = time.perf_counter()
        for _ in range(replays):
            step()
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / replays * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="genesis-1b")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "decode_profile.json")
    parser.add_argument("--coordinate-descent", action="store_true",
                        help="compile with Inductor's coordinate-descent tuning (its matrix-vector products become "
                             "Triton reductions instead of cuBLAS calls)")
    parser.add_argument("--kernels", action="store_true",
                        help="switch on every kernel of genesis_model.decode_kernels")
    args = parser.parse_args()
    if args.kernels:
        from genesis_model import decode_kernels

        for name in decode_kernels.SWITCHES:
            setattr(decode_kernels, name, True)
    if args.coordinate_descent:
        import torch._inductor.config as inductor_config

        inductor_config.coordinate_descent_tuning = True
    config = load_model_config(args.model)
    model = Transformer(config)
    model.init_weights(seed=0)
    model = model.to("cuda", torch.bfloat16)
    matrix_bytes = sum(p.numel() * 2 for name, p in model.named_parameters() if p.dim() == 2)
    result = {**environment(), "git_rev": git_rev(), "command": " ".join(sys.argv),
              "gpu": torch.cuda.get_device_name(0), "model": args.model, "cache_len": CACHE_LEN,
              "matrix_bytes_per_step": matrix_bytes, "coordinate_descent": args.coordinate_descent,
              "kernels": args.kernels}
    result["profile"] = profile_step(model)
    result["graph_step_us"] = round(graph_step_us(model), 1)
    result["gap_us_per_step"] = round(result["graph_step_us"] - result["profile"]["kernel_us_per_step"], 1)
    by_kind = result["profile"]["by_kind"]
    matmul_us = sum(by_kind.get(kind, {}).get("us_per_step", 0.0)
                    for kind in ("matmul (cuBLAS)", "matmul (Triton GEMV)"))
    if matmul_us:
        result["matmul_tb_s"] = round(matrix_bytes / (matmul_us * 1e-6) / 1e12, 3)
    append_run(args.out, result, {key: result[key] for key in ("gpu", "command", "git_rev", "graph_step_us")})
    print(json.dumps({k: v for k, v in result.items() if k != "profile"}, indent=1))
    print(json.dumps(result["profile"]["by_kind"], indent=1))
    for row in result["profile"]["top_kernels"][:20]:
        print(row)


if __name__ == "__main__":
    main()
