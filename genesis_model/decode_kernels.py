"""Triton kernels for the batch-1 decode step on a GPU: one-row matrix products and one-token attention.

A batch-1 decode step multiplies one activation row by every weight matrix and attends one query per head over
the cache: it is bound by reading the weights. cuBLAS's heuristics pick, at M = 1, matrix-vector kernels whose
tiles leave most of an H200's SMs idle on genesis-1b's narrower outputs (`wo` read at 1.39 TB/s, `w2` at 2.05,
bench/gemv.py), and SDPA sends the one-token attention to a flash kernel built for long query blocks (11.4 µs a
layer, bench/decode_profile.py). Here:

- `one_row_linear`: each program takes one row of the weight (or a few) and the whole inner dimension, so even
  a 2,048-row weight spreads over 2,048 programs streaming their rows once with wide loads.
- `one_token_attention`: flash-decoding. The cache is cut into chunks along its length; one program per (key/
  value head, chunk) scores its chunk for the head's whole query group at once (the group padded to 16 rows for
  the tensor cores) and keeps a running max, sum and weighted values; the chunks are merged after.

NOTE: hand-written rather than a library's: torch's own paths (cuBLAS, cuBLASLt, Inductor's reduction with
coordinate-descent tuning, max-autotune's templates; BENCHMARKS.md "Generation") are what is measured slower,
torchao's GEMV kernels are for quantised weights (decoding keeps bf16 weights), and the flash-decoding kernels
of serving engines come with their engines' paged caches.

Both are off unless switched on (USE_GEMV, USE_FLASH_DECODE: see the NOTE there), and the plain op everywhere
else: on the CPU, with Triton missing (CPU torch wheels ship without it), under autograd (no backward is
written), and for more than one row or query.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

triton = None
# NOTE: Triton is imported only where a kernel can run (a CUDA device, or Triton's CPU interpreter in the tests):
# a trainer or test process on a CPU box would pay its import (~0.25 s) for nothing.
if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
    try:
        import triton
        import triton.language as tl
    except ImportError:  # CPU-only torch wheels ship without Triton
        triton = None

# Whether decoding takes each kernel; read when a decode step is traced, so a compiled step keeps the choice it
# was compiled with. bench/generate.py --kernels and bench/gemv.py switch them on to measure them.
# NOTE: both are off by default: each kernel was measured alone on an H200 (the GEMV faster than cuBLAS on every
# genesis-1b shape, bench/results/gemv.json), but no decode step compiled with them (CUDA graph, as `genesis
# serve` and the branch evaluation decode) has been measured yet, and the one that was tried failed to compile
# (since fixed: the attention's scale). A kernel joins the default path once that step is measured faster.
USE_GEMV = False
USE_FLASH_DECODE = False

# (rows per program, inner-dimension chunk, warps) of the GEMV by weight shape (out_features, in_features):
# the fastest of bench/gemv.py's grid on an H200 (bench/results/gemv.json). One row per program won on every
# genesis-1b shape; other shapes take DEFAULT_GEMV_CONFIG.
DEFAULT_GEMV_CONFIG = (1, 512, 4)
GEMV_CONFIGS: dict[tuple[int, int], tuple[int, int, int]] = {
    (3072, 2048): (1, 512, 4),  # wqkv: 4.80 µs against cuBLAS's 6.11
    (2048, 2048): (1, 1024, 4),  # wo: 3.87 against 6.04
    (11264, 2048): (1, 512, 4),  # w13: 12.13 against 13.30
    (2048, 5632): (1, 512, 4),  # w2: 7.18 against 11.27
    (49152, 2048): (1, 1024, 4),  # the tied output projection: 45.91 against 50.58
}

# Cache slots a one-token attention program scores per iteration, and the number of chunks it aims for: the
# chunks times the key/value heads should fill the SMs.
ATTENTION_BLOCK = 32
ATTENTION_TARGET_CHUNKS = 32


def gemv_config(out_features: int, in_features: int) -> tuple[int, int, int]:
    return GEMV_CONFIGS.get((out_features, in_features), DEFAULT_GEMV_CONFIG)


def attention_chunk(cache_len: int) -> int:
    """Slots per program: a multiple of ATTENTION_BLOCK, so that about ATTENTION_TARGET_CHUNKS cover the cache."""
    per_chunk = -(-cache_len // ATTENTION_TARGET_CHUNKS)
    return max(1, -(-per_chunk // ATTENTION_BLOCK)) * ATTENTION_BLOCK


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

    @triton.jit
    def _one_token_attention_kernel(q_ptr, k_ptr, v_ptr, visible_ptr, max_ptr, sum_ptr, acc_ptr,
                                    SCALE: tl.constexpr, L: tl.constexpr, E: tl.constexpr, G: tl.constexpr,
                                    G_PAD: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
        """One (key/value head, chunk of the cache): the head's G queries (rows kv_head·G … of q, (H, E)) over
        slots [chunk·CHUNK, (chunk+1)·CHUNK) of its keys and values ((KH, L, E) each), masked by `visible`
        (L,). Writes the chunk's running max and sum (CHUNKS, H) and unnormalised output (CHUNKS, H, E)."""
        kv_head, chunk = tl.program_id(0), tl.program_id(1)
        group = tl.arange(0, G_PAD)
        dims = tl.arange(0, E)
        heads = kv_head * G + group
        in_group = group < G
        # NOTE: the products run in tf32 on fp32 copies: q and k, stored in bf16 or fp16, convert exactly (tf32
        # keeps 10 mantissa bits), the softmax weights keep more bits than bf16 would, the work is tiny next to the
        # loads, and Triton's CPU interpreter (the tests) has no bf16 products.
        q = tl.load(q_ptr + heads[:, None] * E + dims[None, :], mask=in_group[:, None], other=0.0).to(tl.float32)
        running_max = tl.full((G_PAD,), float("-inf"), dtype=tl.float32)
        running_sum = tl.zeros((G_PAD,), dtype=tl.float32)
        acc = tl.zeros((G_PAD, E), dtype=tl.float32)
        cache = kv_head * L * E
        for offset in range(0, CHUNK, BLOCK):
            slots = chunk * CHUNK + offset + tl.arange(0, BLOCK)
            in_cache = slots < L
            visible = tl.load(visible_ptr + slots, mask=in_cache, other=0) != 0
            k = tl.load(k_ptr + cache + slots[:, None] * E + dims[None, :], mask=in_cache[:, None],
                        other=0.0).to(tl.float32)
            v = tl.load(v_ptr + cache + slots[:, None] * E + dims[None, :], mask=in_cache[:, None],
                        other=0.0).to(tl.float32)
            scores = tl.dot(q, tl.trans(k), input_precision="tf32") * SCALE  # (G_PAD, BLOCK)
            scores = tl.where(visible[None, :], scores, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(scores, axis=1))
            # A row with nothing visible yet keeps max -inf: exp against 0 instead gives 0 weights, not NaN.
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)
            weights = tl.exp(scores - shift[:, None])
            rescale = tl.exp(running_max - shift)
            running_sum = running_sum * rescale + tl.sum(weights, axis=1)
            acc = acc * rescale[:, None] + tl.dot(weights, v, input_precision="tf32")
            running_max = new_max
        out = chunk * G * tl.num_programs(0) + heads
        tl.store(max_ptr + out, running_max, mask=in_group)
        tl.store(sum_ptr + out, running_sum, mask=in_group)
        tl.store(acc_ptr + out[:, None] * E + dims[None, :], acc, mask=in_group[:, None])

    @torch.library.triton_op("genesis::one_token_attention_chunks", mutates_args=())
    def one_token_attention_chunks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor,
                                   chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (H, E), k and v (KH, L, E), visible (L,) bool → per chunk of the cache: max (C, H), sum (C, H) and
        unnormalised output (C, H, E), fp32."""
        n_heads, head_dim = q.shape
        n_kv_heads, cache_len, _ = k.shape
        group = n_heads // n_kv_heads
        chunks = triton.cdiv(cache_len, chunk)
        running_max = torch.empty((chunks, n_heads), dtype=torch.float32, device=q.device)
        running_sum = torch.empty((chunks, n_heads), dtype=torch.float32, device=q.device)
        acc = torch.empty((chunks, n_heads, head_dim), dtype=torch.float32, device=q.device)
        # NOTE: the scale is a compile-time constant: as a float argument Inductor passed it in fp64, which made
        # the scores fp64 and the second product's operands mismatched (the decode step failed to compile).
        torch.library.wrap_triton(_one_token_attention_kernel)[(n_kv_heads, chunks)](
            q, k, v, visible, running_max, running_sum, acc, SCALE=1.0 / math.sqrt(head_dim), L=cache_len,
            E=head_dim, G=group, G_PAD=max(16, triton.next_power_of_2(group)), CHUNK=chunk, BLOCK=ATTENTION_BLOCK,
            num_warps=4)
        return running_max, running_sum, acc


def gemv_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (USE_GEMV and triton is not None and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
            and weight.dtype == x.dtype and x.shape[:-1].numel() == 1 and not torch.is_grad_enabled()
            and x.is_contiguous() and weight.is_contiguous())


def one_row_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`F.linear(x, weight)` (no bias); one row on a GPU outside autograd runs the Triton kernel."""
    if gemv_applies(x, weight):
        return gemv(x, weight, *gemv_config(*weight.shape))
    return F.linear(x, weight)


def attention_applies(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None) -> bool:
    head_dim = q.shape[-1]
    return (USE_FLASH_DECODE and triton is not None and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)
            and k.dtype == q.dtype and q.shape[0] == 1 and q.shape[2] == 1 and mask is not None
            and mask.numel() == k.shape[2] and mask.dtype == torch.bool and q.shape[1] % k.shape[1] == 0
            and head_dim >= 16 and head_dim & (head_dim - 1) == 0 and not torch.is_grad_enabled())


def one_token_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
                        ) -> torch.Tensor:
    """`F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)` for q (B, H, T, E) and k, v
    (B, KH, L, E); one query row (B = T = 1) on a GPU outside autograd runs flash-decoding in Triton."""
    if attention_applies(q, k, mask):
        return flash_decode(q, k, v, mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def flash_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The Triton path of `one_token_attention` (q (1, H, 1, E), k and v (1, KH, L, E), mask of L booleans)."""
    n_heads, head_dim = q.shape[1], q.shape[3]
    running_max, running_sum, acc = one_token_attention_chunks(
        q.reshape(n_heads, head_dim).contiguous(), k[0].contiguous(), v[0].contiguous(),
        mask.reshape(-1).contiguous(), attention_chunk(k.shape[2]))
    # Merge the chunks: each is weighted by exp(its max − the overall max); a chunk with nothing visible has
    # max -inf and weight 0 (the query's own slot is always visible, so the overall max is finite).
    weights = torch.exp(running_max - running_max.amax(dim=0, keepdim=True))
    out = (weights[..., None] * acc).sum(dim=0) / (weights * running_sum).sum(dim=0)[:, None]
    return out.to(q.dtype).view(1, n_heads, 1, head_dim)
