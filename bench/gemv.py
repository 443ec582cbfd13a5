"""The kernels of genesis-1b's batch-1 decode step, one by one (#27 item 2). The one-row matrix products: cuBLAS
(what `F.linear` picks), cuBLASLt, and genesis_model.decode_kernels's Triton GEMV in each configuration of a
grid, on every weight shape a decode step reads (wqkv, wo, w13, w2, the tied output projection). The one-token
attention over the cache (`--cache-lens`, the mask hiding the slots past the middle): SDPA as decoding called it
before, and decode_kernels.flash_decode (switched on or not).

Each variant is captured in a CUDA graph that runs it `--repeats` times over rotating copies of the weight
(together larger than the GPU's L2 cache, as a decode step's 2 GB of weights are), so the time is the kernel's
own with nothing from the host between launches. Reported per shape: µs per product, GB/s on the weight's
bytes, and the largest difference from an fp32 product. The best Triton configuration per shape is what
`genesis_model.decode_kernels.GEMV_CONFIGS` should hold. The attention's copies rotate alike (the caches of 20
layers).

    python bench/gemv.py --out $OUT/gemv.json
    python bench/gemv.py --fused-only --block-n 1 2 4 --block-k 512 1024 --warps 4   # the block's fused GEMVs
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.common import append_run, environment, git_rev  # noqa: E402
from genesis.config import load_model_config  # noqa: E402
from genesis_model import decode_kernels  # noqa: E402


L2_FLUSH_BYTES = 256 * 2**20


def decode_shapes(config) -> dict[str, tuple[int, int]]:
    head_dim = config.head_dim
    return {
        "wqkv": ((config.n_heads + 2 * config.n_kv_heads) * head_dim, config.dim),
        "wo": (config.dim, config.n_heads * head_dim),
        "w13": (2 * config.ffn_dim, config.dim),
        "w2": (config.dim, config.ffn_dim),
        "output": (config.vocab_size, config.dim),
    }


def graph_time_us(op, copies: int, repeats: int, replays: int) -> float:
    """µs per call of op(i) (i cycling over the weight copies), from a CUDA graph of `repeats` calls."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(3):
            op(i % copies)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(repeats):
            op(i % copies)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / (replays * repeats)


def time_variant(variant: str, op, reference: torch.Tensor, copies: int, repeats: int, replays: int,
                 **labels) -> dict:
    """One variant's row: µs per call and the largest difference of op(0) from `reference`, or the error that
    stopped it (a configuration Triton cannot build is recorded, not fatal)."""
    with torch.inference_mode():
        try:
            error = (op(0).float() - reference).abs().max().item()
            us = graph_time_us(op, copies, repeats, replays)
        except Exception as err:  # noqa: BLE001
            return {"variant": variant, **labels, "error": repr(err)[:300]}
    return {"variant": variant, **labels, "us": round(us, 2), "max_abs_err": round(error, 5)}


def weight_copies(n: int, k: int, generator: torch.Generator) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Copies of an (n, k) bf16 weight, together larger than L2 (at least 2), and one activation row (1, 1, k)."""
    copies = max(2, -(-L2_FLUSH_BYTES // (n * k * 2)))
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=generator) * k ** -0.5
               for _ in range(copies)]
    return weights, torch.randn(1, 1, k, device="cuda", dtype=torch.bfloat16, generator=generator)


def measure_shape(name: str, n: int, k: int, grid: list[tuple[int, int, int]], repeats: int, replays: int) -> dict:
    weight_bytes = n * k * 2
    generator = torch.Generator(device="cuda").manual_seed(0)
    weights, x = weight_copies(n, k, generator)
    copies = len(weights)
    reference = F.linear(x.float(), weights[0].float())
    row = {"shape": name, "out_features": n, "in_features": k, "weight_mb": round(weight_bytes / 1e6, 2),
           "copies": copies, "variants": []}

    def record(variant: str, op, config=None):
        timed = time_variant(variant, op, reference, copies, repeats, replays, config=config)
        if "us" in timed:
            timed["gb_s"] = round(weight_bytes / timed["us"] / 1e3, 1)
        row["variants"].append(timed)

    record("cublas", lambda i: F.linear(x, weights[i]))
    torch.backends.cuda.preferred_blas_library("cublaslt")
    record("cublaslt", lambda i: F.linear(x, weights[i]))
    torch.backends.cuda.preferred_blas_library("cublas")
    for block_n, block_k, warps in grid:
        if block_k > max(k, 16) * 2:
            continue
        record("triton", lambda i, c=(block_n, block_k, warps): decode_kernels.gemv(x, weights[i], *c),
               [block_n, block_k, warps])
    timed = [v for v in row["variants"] if "us" in v]
    triton_rows = [v for v in timed if v["variant"] == "triton"]
    row["best_triton"] = min(triton_rows, key=lambda v: v["us"]) if triton_rows else None
    row["cublas_us"] = next((v["us"] for v in timed if v["variant"] == "cublas"), None)
    if row["best_triton"] and row["cublas_us"]:
        row["triton_speedup"] = round(row["cublas_us"] / row["best_triton"]["us"], 3)
    print(f"gemv {name} {n}x{k}: cublas {row['cublas_us']} us, best triton {row['best_triton']}", flush=True)
    del weights
    torch.cuda.empty_cache()
    return row


# What each of a block's products carries in Block.forward_one_row: (norm before, SwiGLU after, residual after).
FUSED_VARIANTS = {"wqkv": (True, False, False), "wo": (False, False, True), "w13": (True, True, False),
                  "w2": (False, False, True)}


def measure_fused(name: str, n: int, k: int, grid: list[tuple[int, int, int]], repeats: int, replays: int) -> dict:
    """`decode_kernels.fused_gemv` as Block.forward_one_row calls it on this shape, over the grid, beside the
    plain GEMV at its GEMV_CONFIGS configuration (the product alone, the small ops left out)."""
    norm, gated, residual = FUSED_VARIANTS[name]
    weight_bytes = n * k * 2
    generator = torch.Generator(device="cuda").manual_seed(0)
    weights, x = weight_copies(n, k, generator)
    copies = len(weights)
    gain = torch.rand(k, device="cuda", generator=generator).to(torch.bfloat16) + 0.5
    out_features = n // 2 if gated else n
    skip = torch.randn(1, 1, out_features, device="cuda", dtype=torch.bfloat16, generator=generator)
    normed = x.float()
    if norm:
        normed = normed * torch.rsqrt(normed.pow(2).mean(-1, keepdim=True) + 1e-5) * gain.float()
    reference = F.linear(normed, weights[0].float())
    if gated:
        gate, up = reference.split(out_features, dim=-1)
        reference = F.silu(gate) * up
    if residual:
        reference = reference + skip.float()
    plain_reference = F.linear(x.float(), weights[0].float())
    row = {"shape": name, "out_features": n, "in_features": k, "weight_mb": round(weight_bytes / 1e6, 2),
           "norm": norm, "gated": gated, "residual": residual, "copies": copies, "variants": []}
    plain_config = list(decode_kernels.gemv_config(n, k))
    row["variants"].append(time_variant("plain", lambda i: decode_kernels.gemv(x, weights[i], *plain_config),
                                        plain_reference, copies, repeats, replays, config=plain_config))
    for block_n, block_k, warps in grid:
        if block_k > max(k, 16) * 2:
            continue
        row["variants"].append(time_variant(
            "fused", lambda i, c=(block_n, block_k, warps): decode_kernels.fused_gemv(
                x, weights[i], gain if norm else None, skip if residual else None, gated, 1e-5, *c),
            reference, copies, repeats, replays, config=[block_n, block_k, warps]))
    for variant in row["variants"]:
        if "us" in variant:
            variant["gb_s"] = round(weight_bytes / variant["us"] / 1e3, 1)
    fused = [v for v in row["variants"] if v["variant"] == "fused" and "us" in v]
    row["best_fused"] = min(fused, key=lambda v: v["us"]) if fused else None
    row["fused_at_plain_config"] = next((v for v in fused if v["config"] == plain_config), None)
    row["plain_us"] = row["variants"][0].get("us")
    print(f"fused {name}: plain {row['plain_us']} us, at its config {row['fused_at_plain_config']}, "
          f"best {row['best_fused']}", flush=True)
    del weights
    torch.cuda.empty_cache()
    return row


def measure_attention(config, cache_len: int, repeats: int, replays: int) -> dict:
    head_dim = config.head_dim
    cache_bytes = 2 * config.n_kv_heads * cache_len * head_dim * 2
    copies = config.n_layers
    generator = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, config.n_heads, 1, head_dim, device="cuda", dtype=torch.bfloat16, generator=generator)
    caches = [(torch.randn(1, config.n_kv_heads, cache_len, head_dim, device="cuda", dtype=torch.bfloat16,
                           generator=generator),
               torch.randn(1, config.n_kv_heads, cache_len, head_dim, device="cuda", dtype=torch.bfloat16,
                           generator=generator)) for _ in range(copies)]
    mask = (torch.arange(cache_len, device="cuda") <= cache_len // 2)[None, None, None]
    k0, v0 = caches[0]
    reference = F.scaled_dot_product_attention(q.float(), k0.float(), v0.float(), attn_mask=mask, enable_gqa=True)
    row = {"cache_len": cache_len, "cache_mb": round(cache_bytes / 1e6, 3)}
    position = torch.tensor([cache_len // 2], device="cuda")
    # "triton" reads the mask, as a step of left-padded prompts does; "triton_causal" the position alone.
    ops = {"sdpa": lambda i: F.scaled_dot_product_attention(q, *caches[i], attn_mask=mask, enable_gqa=True),
           "triton": lambda i: decode_kernels.flash_decode(q, *caches[i], mask, position),
           "triton_causal": lambda i: decode_kernels.flash_decode(q, *caches[i], None, position)}
    row["variants"] = [time_variant(name, op, reference, copies, repeats, replays) for name, op in ops.items()]
    timed = {v["variant"]: v["us"] for v in row["variants"] if "us" in v}
    if "sdpa" in timed and "triton" in timed:
        row["triton_speedup"] = round(timed["sdpa"] / timed["triton"], 3)
    print(f"attention cache {cache_len}: {row['variants']}", flush=True)
    return row


def decode_check(model_name: str, prompt_tokens: int = 128) -> dict:
    """genesis-1b (random bf16 weights): the logits of one cached decode step, through the Triton kernels,
    against the uncached forward's last position (cuBLAS GEMMs and SDPA over the whole sequence); beside it the
    same step with the kernels switched off (cuBLAS and SDPA), whose difference is bf16's alone."""
    from genesis_model.model import Transformer

    config = load_model_config(model_name)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Transformer(config)
    model.init_weights(seed=0)
    model = model.to(torch.bfloat16).eval()
    tokens = torch.randint(0, config.vocab_size, (1, prompt_tokens + 1), device="cuda")
    with torch.inference_mode():
        full = model(tokens)[:, -1]
        steps = {}
        for name, use in (("kernels", True), ("cublas_sdpa", False)):
            with decode_kernels.switched(**{switch: use for switch in decode_kernels.SWITCHES}):
                model.setup_kv_cache(batch_size=1, max_seq_len=prompt_tokens + 64)
                model(tokens[:, :-1], positions=torch.arange(prompt_tokens, device="cuda"))
                steps[name] = model(tokens[:, -1:], positions=torch.tensor([prompt_tokens], device="cuda"))[:, -1]
                model.clear_kv_cache()
    check = {"logit_std": round(full.std().item(), 4)}
    for name, step in steps.items():
        diff = (step - full).abs()
        check[name] = {"max_abs_diff": round(diff.max().item(), 5), "mean_abs_diff": round(diff.mean().item(), 6),
                       "same_argmax": bool(step.argmax() == full.argmax()),
                       "top10_overlap": len(set(step.topk(10).indices.tolist()[0])
                                            & set(full.topk(10).indices.tolist()[0]))}
    print("decode check", check, flush=True)
    del model
    torch.cuda.empty_cache()
    return check


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="genesis-1b")
    parser.add_argument("--block-n", type=int, nargs="*", default=[1, 2, 4, 8, 16])
    parser.add_argument("--block-k", type=int, nargs="*", default=[128, 256, 512, 1024])
    parser.add_argument("--warps", type=int, nargs="*", default=[2, 4, 8])
    parser.add_argument("--cache-lens", type=int, nargs="*", default=[384, 2048])
    parser.add_argument("--skip-gemv", action="store_true", help="the attention only")
    parser.add_argument("--fused-only", action="store_true",
                        help="only the block's fused GEMVs (fused_gemv) over the grid, beside the plain GEMV")
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--replays", type=int, default=10)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "gemv.json")
    args = parser.parse_args()
    if decode_kernels.triton is None or not torch.cuda.is_available():
        sys.exit("bench/gemv.py: needs a CUDA GPU and Triton (run it on the device)")
    started = time.time()
    config = load_model_config(args.model)
    grid = list(itertools.product(args.block_n, args.block_k, args.warps))
    if args.fused_only:
        fused = [measure_fused(name, n, k, grid, args.repeats, args.replays)
                 for name, (n, k) in decode_shapes(config).items() if name in FUSED_VARIANTS]
        run = {"command": "python " + " ".join(sys.argv), "git_rev": git_rev(), **environment(),
               "triton": decode_kernels.triton.__version__, "model": args.model, "fused": fused,
               "seconds": round(time.time() - started, 1)}
        append_run(args.out, run, {"best_fused_config": {f["shape"]: f["best_fused"]["config"]
                                                         for f in fused if f["best_fused"]}})
        return
    shapes = [] if args.skip_gemv else [measure_shape(name, n, k, grid, args.repeats, args.replays)
                                        for name, (n, k) in decode_shapes(config).items()]
    check = decode_check(args.model)
    attention = [measure_attention(config, cache_len, args.repeats, args.replays) for cache_len in args.cache_lens]
    run = {"command": "python " + " ".join(sys.argv), "git_rev": git_rev(), **environment(),
           "triton": decode_kernels.triton.__version__, "model": args.model, "shapes": shapes,
           "attention": attention, "decode_check": check,
           "seconds": round(time.time() - started, 1)}
    latest = {"gpu": run["machine"], "command": run["command"], "git_rev": run["git_rev"],
              "best_triton_config": {s["shape"]: s["best_triton"]["config"] for s in shapes if s["best_triton"]},
              "triton_speedup": {s["shape"]: s.get("triton_speedup") for s in shapes},
              "attention_triton_speedup": {a["cache_len"]: a.get("triton_speedup") for a in attention},
              "decode_check": check}
    if not shapes:  # an attention-only run leaves the GEMV figures of the run before
        del latest["best_triton_config"], latest["triton_speedup"]
    append_run(args.out, run, latest)
    print(json.dumps(latest, indent=1))


if __name__ == "__main__":
    main()
