"""One-row matrix products for batch-1 decoding on a GPU.

A batch-1 decode step multiplies one activation row by every weight matrix: it is a matrix-vector product
bound by reading the weight. cuBLAS's heuristics pick, at M = 1, kernels whose tiles leave most of an H200's
132 SMs idle on genesis-1b's narrower outputs (the 2,048- and 3,072-wide `wo` and `wqkv` read at ~1.7 TB/s,
a third of the memory's bandwidth; bench/decode_profile.py). The Triton kernel here gives each program a
few rows and the whole inner dimension, so even a 2,048-row weight spreads over hundreds of programs, each
streaming its rows once with wide loads. `bench/gemv.py` times it against cuBLAS on every decode shape.

NOTE: hand-written rather than a library's: torch's own paths (cuBLAS, cuBLASLt, Inductor's reduction with
coordinate-descent tuning; BENCHMARKS.md "Generation") are what is measured slower, and torchao's GEMV
kernels are for quantised weights, while decoding keeps bf16 weights.

Only `one_row_linear` is for callers: it is `F.linear` everywhere, and the kernel only for one row of bf16 or
fp16 on a CUDA device outside autograd (no backward is written) with Triton importable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch wheels ship without Triton
    triton = None

# (rows per program, inner-dimension chunk, warps) by (out_features, in_features); measured on an H200 with
# bench/gemv.py. Shapes not listed take DEFAULT_CONFIG.
DEFAULT_CONFIG = (4, 512, 4)
CONFIGS: dict[tuple[int, int], tuple[int, int, int]] = {}


def kernel_config(out_features: int, in_features: int) -> tuple[int, int, int]:
    return CONFIGS.get((out_features, in_features), DEFAULT_CONFIG)


if triton is not None:

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, out_ptr, N, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """out[n] = Σ_k x[k] · w[n, k] for BLOCK_N rows of w (row-major, N × K); fp32 accumulation, one sum
        across the chunk at the end. K is a compile-time constant: a model has a few inner dimensions, and the
        loop over them is then known to the compiler."""
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_in = rows < N
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for start in range(0, K, BLOCK_K):
            cols = start + tl.arange(0, BLOCK_K)
            col_in = cols < K
            x = tl.load(x_ptr + cols, mask=col_in, other=0.0)
            w = tl.load(w_ptr + rows[:, None] * K + cols[None, :], mask=row_in[:, None] & col_in[None, :],
                        other=0.0, eviction_policy="evict_first")
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        tl.store(out_ptr + rows, tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty), mask=row_in)

    @torch.library.triton_op("genesis::gemv", mutates_args=())
    def gemv(x: torch.Tensor, weight: torch.Tensor, block_n: int, block_k: int, num_warps: int) -> torch.Tensor:
        """x (..., K) holding one row, weight (N, K) contiguous → (..., N) in x's dtype."""
        n, k = weight.shape
        out = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
        grid = (triton.cdiv(n, block_n),)
        torch.library.wrap_triton(_gemv_kernel)[grid](x, weight, out, n, k, BLOCK_N=block_n, BLOCK_K=block_k,
                                                      num_warps=num_warps)
        return out


def kernel_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (triton is not None and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
            and weight.dtype == x.dtype and x.shape[:-1].numel() == 1 and not torch.is_grad_enabled()
            and x.is_contiguous() and weight.is_contiguous())


def one_row_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`F.linear(x, weight)` (no bias); one row on a GPU outside autograd runs the Triton kernel."""
    if kernel_applies(x, weight):
        return gemv(x, weight, *kernel_config(*weight.shape))
    return F.linear(x, weight)
