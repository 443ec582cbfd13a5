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
  the tensor cores) and keeps a running max, sum and weighted values; a second kernel merges the chunks.
- `norm_gemv` / `gemv_add`: the GEMV with a block's small ops folded in (the RMS norm before a product, SwiGLU
  after w13's, the residual add after wo's and w2's): a batch-1 step is as much kernel launches as bytes, and
  each small op was a kernel of its own (~1–1.6 µs each, nine a layer, bench/decode_profile.py --kernels).
- `rope_and_cache`: a one-token step's rotary embedding of its queries and keys, and the writes of its keys and
  values into the cache, in one kernel (Inductor made four of them a layer).

NOTE: hand-written rather than a library's: torch's own paths (cuBLAS, cuBLASLt, Inductor's reduction with
coordinate-descent tuning, max-autotune's templates; BENCHMARKS.md "Generation") are what is measured slower,
torchao's GEMV kernels are for quantised weights (decoding keeps bf16 weights), and the flash-decoding kernels
of serving engines come with their engines' paged caches.

Each has a switch (USE_GEMV, USE_FLASH_DECODE, USE_FUSED_BLOCK, USE_ROPE_CACHE: see there), and the plain ops
run everywhere else: on the CPU, with Triton missing (CPU torch wheels ship without it), under autograd (no backward is
written), and for more than one row or query.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager

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
# was compiled with. bench/generate.py --kernels and bench/gemv.py switch them to measure them. Each is on because
# the batch-1 step compiled as a CUDA graph was measured faster with it (genesis-1b, one H200, generate.json):
# the GEMV and flash-decoding 0.924 ms against 1.194 with cuBLAS and SDPA (git 485f87a); with them, the block's
# norms, SwiGLU and residual adds folded into its GEMVs 0.900 against 0.904, and the rotations and cache writes in
# one kernel as well 0.868 (git 8696f55).
USE_GEMV = True
USE_FLASH_DECODE = True
# The block's norms, SwiGLU and residual adds folded into its GEMVs (`fused_gemv`, Block's one-row path).
USE_FUSED_BLOCK = True
# The rotary embedding of a one-token step's queries and keys, and its cache writes, in one kernel
# (`rope_and_cache`) instead of Inductor's four a layer.
USE_ROPE_CACHE = True
SWITCHES = ("USE_GEMV", "USE_FLASH_DECODE", "USE_FUSED_BLOCK", "USE_ROPE_CACHE")


@contextmanager
def switched(**values: bool) -> Iterator[None]:
    """The switches set as given (e.g. `switched(USE_GEMV=False)`) for the block, as they were after it: the
    benches measure each path in one process."""
    unknown = set(values) - set(SWITCHES)
    if unknown:
        raise ValueError(f"decode_kernels.switched: no switch {sorted(unknown)}; the switches are {SWITCHES}")
    before = {name: globals()[name] for name in SWITCHES}
    globals().update(values)
    try:
        yield
    finally:
        globals().update(before)

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

# The same for `fused_gemv`, by what it folds in (NORM, GATED, RESIDUAL) and weight shape: the fastest of
# `bench/gemv.py --fused-only`'s two grids on an H200 (bench/results/gemv.json, runs of 2026-12-03 at c2216aa).
# The norm's gain and x are read again by every program, so the normed products gain from 4 rows a program
# where the plain GEMV does not. At the plain GEMV's configuration the fused kernels took 97 µs more a step.
FUSED_GEMV_CONFIGS: dict[tuple[bool, bool, bool, int, int], tuple[int, int, int]] = {
    (True, False, False, 3072, 2048): (4, 1024, 4),  # norm + wqkv: 5.30 µs; 6.16 at wqkv's plain config
    (False, False, True, 2048, 2048): (1, 512, 2),  # wo + residual: 3.90; 4.01
    (True, True, False, 11264, 2048): (4, 2048, 4),  # norm + w13 + SwiGLU: 12.77; 15.22
    (False, False, True, 2048, 5632): (1, 512, 4),  # w2 + residual: 7.20 (its plain config was the best)
}

# Cache slots a one-token attention program scores per iteration, and the number of chunks it aims for: the
# chunks times the key/value heads should fill the SMs.
ATTENTION_BLOCK = 32
ATTENTION_TARGET_CHUNKS = 32


def gemv_config(out_features: int, in_features: int) -> tuple[int, int, int]:
    return GEMV_CONFIGS.get((out_features, in_features), DEFAULT_GEMV_CONFIG)


def fused_gemv_config(norm: bool, gated: bool, residual: bool, out_features: int, in_features: int
                      ) -> tuple[int, int, int]:
    """`fused_gemv`'s configuration for a weight of this shape with these options folded in: FUSED_GEMV_CONFIGS,
    else the plain GEMV's."""
    return FUSED_GEMV_CONFIGS.get((norm, gated, residual, out_features, in_features),
                                  gemv_config(out_features, in_features))


def attention_chunk(cache_len: int) -> int:
    """Slots per program: a multiple of ATTENTION_BLOCK, so that about ATTENTION_TARGET_CHUNKS cover the cache."""
    per_chunk = -(-cache_len // ATTENTION_TARGET_CHUNKS)
    return max(1, -(-per_chunk // ATTENTION_BLOCK)) * ATTENTION_BLOCK


if triton is not None:

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, out_ptr, norm_ptr, residual_ptr, N, K: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, NORM: tl.constexpr, EPS: tl.constexpr, GATED: tl.constexpr,
                     RESIDUAL: tl.constexpr):
        """out[n] = Σ_k x[k] · w[n, k] for BLOCK_N rows of w (row-major, K columns); fp32 accumulation, one sum
        across the chunk at the end. K is a compile-time constant: a model has a few inner dimensions, and the
        loop over them is then known to the compiler. Optionally, each a compile-time switch:

        - NORM: x is first RMS-normalised with gain `norm` (K,): out = rsqrt(mean(x²) + EPS) · Σ_k x[k]·norm[k]·w.
          Every program reads all of x anyway, so the sum of squares costs no load; the scale applies once, at
          the end (the plain norm rounds the normalised row to bf16 before the product; this does not).
        - GATED: w holds 2N rows, gate rows then up rows (SwiGLU's fused w13): out[n] = silu(gate[n]) · up[n],
          rounded as the plain ops round (each product to x's dtype, then silu, then the product).
        - RESIDUAL: out[n] = residual[n] + the product rounded to x's dtype (the residual stream's add).
        """
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_in = rows < N
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        squares = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for start in range(0, K, BLOCK_K):
            cols = start + tl.arange(0, BLOCK_K)
            col_in = cols < K
            x = tl.load(x_ptr + cols, mask=col_in, other=0.0).to(tl.float32)
            if NORM:
                squares += x * x
                x = x * tl.load(norm_ptr + cols, mask=col_in, other=0.0).to(tl.float32)
            in_tile = row_in[:, None] & col_in[None, :]
            w = tl.load(w_ptr + rows[:, None] * K + cols[None, :], mask=in_tile, other=0.0,
                        eviction_policy="evict_first")
            acc += w.to(tl.float32) * x[None, :]
            if GATED:
                w_up = tl.load(w_ptr + (rows[:, None] + N) * K + cols[None, :], mask=in_tile, other=0.0,
                               eviction_policy="evict_first")
                acc_up += w_up.to(tl.float32) * x[None, :]
        dtype = out_ptr.dtype.element_ty
        out = tl.sum(acc, axis=1)
        if NORM:
            scale = tl.rsqrt(tl.sum(squares, axis=0) / K + EPS)
            out = out * scale
        if GATED:
            up = tl.sum(acc_up, axis=1)
            if NORM:
                up = up * scale
            gate = out.to(dtype).to(tl.float32)
            out = (gate * tl.sigmoid(gate)).to(dtype).to(tl.float32) * up.to(dtype).to(tl.float32)
        if RESIDUAL:
            out = tl.load(residual_ptr + rows, mask=row_in, other=0.0).to(tl.float32) + out.to(dtype).to(tl.float32)
        tl.store(out_ptr + rows, out.to(dtype), mask=row_in)

    def _launch_gemv(x, weight, norm_weight, residual, gated, eps, block_n, block_k, num_warps):
        rows, k = weight.shape
        n = rows // 2 if gated else rows
        out = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
        # NOTE: a switched-off operand's pointer is x's: the kernel never reads it, but Triton wants a tensor.
        torch.library.wrap_triton(_gemv_kernel)[(triton.cdiv(n, block_n),)](
            x, weight, out, x if norm_weight is None else norm_weight, x if residual is None else residual, n, k,
            BLOCK_N=block_n, BLOCK_K=block_k, NORM=norm_weight is not None, EPS=eps, GATED=gated,
            RESIDUAL=residual is not None, num_warps=num_warps)
        return out

    @torch.library.triton_op("genesis::gemv", mutates_args=())
    def gemv(x: torch.Tensor, weight: torch.Tensor, block_n: int, block_k: int, num_warps: int) -> torch.Tensor:
        """x (..., K) holding one row, weight (N, K) contiguous → (..., N) in x's dtype."""
        return _launch_gemv(x, weight, None, None, False, 0.0, block_n, block_k, num_warps)

    @torch.library.triton_op("genesis::fused_gemv", mutates_args=())
    def fused_gemv(x: torch.Tensor, weight: torch.Tensor, norm_weight: torch.Tensor | None,
                   residual: torch.Tensor | None, gated: bool, eps: float, block_n: int, block_k: int,
                   num_warps: int) -> torch.Tensor:
        """`gemv` with what the neighbouring ops of a block do folded in (see `_gemv_kernel`): an RMS norm of x
        with gain `norm_weight` (K,) and `eps` before; SwiGLU over weight's (2N, K) gate and up rows (`gated`),
        and/or `residual` (..., N) added after. The eps is a compile-time constant of the kernel (a model has one)."""
        return _launch_gemv(x, weight, norm_weight, residual, gated, eps, block_n, block_k, num_warps)

    @triton.jit
    def _rope_and_cache_kernel(qkv_ptr, cos_ptr, sin_ptr, position_ptr, q_ptr, k_cache_ptr, v_cache_ptr,
                               H: tl.constexpr, KH: tl.constexpr, E: tl.constexpr, L: tl.constexpr):
        """One head of the fused projection's row (H query heads, KH key heads, KH value heads of E each):
        queries and keys rotated (model.apply_rope's "rotate half" layout and roundings: cos and sin, the rows
        at `position` of the (positions, E) tables, cast to the row's dtype, each product rounded, then their
        sum), queries written to q (H, E), keys and values into the caches ((KH, L, E) each) at the slot
        `position` (a one-element tensor, so that a CUDA graph replays the step at every position)."""
        head = tl.program_id(0)
        dims = tl.arange(0, E)
        dtype = qkv_ptr.dtype.element_ty
        x = tl.load(qkv_ptr + head * E + dims)
        slot = tl.load(position_ptr)
        if head < H + KH:
            partner = tl.load(qkv_ptr + head * E + (dims + E // 2) % E).to(tl.float32)
            rotated_half = tl.where(dims < E // 2, -partner, partner)
            cos = tl.load(cos_ptr + slot * E + dims).to(dtype).to(tl.float32)
            sin = tl.load(sin_ptr + slot * E + dims).to(dtype).to(tl.float32)
            x = ((x.to(tl.float32) * cos).to(dtype).to(tl.float32)
                 + (rotated_half * sin).to(dtype).to(tl.float32)).to(dtype)
            if head < H:
                tl.store(q_ptr + head * E + dims, x)
            else:
                tl.store(k_cache_ptr + ((head - H) * L + slot) * E + dims, x)
        else:
            tl.store(v_cache_ptr + ((head - H - KH) * L + slot) * E + dims, x)

    @torch.library.triton_op("genesis::rope_and_cache", mutates_args=("k_cache", "v_cache"))
    def rope_and_cache_heads(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position: torch.Tensor,
                             k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """qkv ((H + 2·KH)·E,) one token's fused projection, cos and sin the rotary tables (positions, E),
        position (1,) → its rotated queries (H, E); its rotated keys and its values written into k_cache and
        v_cache (1, KH, L, E), contiguous, at that slot.
        NOTE: the caches are passed whole, not as views of their one row: a mutated view of a compiled graph's
        input is one more thing for functionalization to undo."""
        n_kv_heads, cache_len, head_dim = k_cache.shape[1:]
        n_heads = qkv.shape[0] // head_dim - 2 * n_kv_heads
        q = torch.empty((n_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
        torch.library.wrap_triton(_rope_and_cache_kernel)[(n_heads + 2 * n_kv_heads,)](
            qkv, cos, sin, position, q, k_cache, v_cache, H=n_heads, KH=n_kv_heads, E=head_dim, L=cache_len,
            num_warps=1)
        return q

    @triton.jit
    def _one_token_attention_kernel(q_ptr, k_ptr, v_ptr, visible_ptr, position_ptr, max_ptr, sum_ptr, acc_ptr,
                                    SCALE: tl.constexpr, L: tl.constexpr, E: tl.constexpr, G: tl.constexpr,
                                    G_PAD: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                                    HAS_MASK: tl.constexpr):
        """One (key/value head, chunk of the cache): the head's G queries (rows kv_head·G … of q, (H, E)) over
        slots [chunk·CHUNK, (chunk+1)·CHUNK) of its keys and values ((KH, L, E) each), masked by `visible`
        (L,) if HAS_MASK, else causally: the slots up to `position` (one). Writes the chunk's running max and
        sum (CHUNKS, H) and unnormalised output (CHUNKS, H, E)."""
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
        last_visible = L if HAS_MASK else tl.load(position_ptr)
        for offset in range(0, CHUNK, BLOCK):
            slots = chunk * CHUNK + offset + tl.arange(0, BLOCK)
            in_cache = slots < L
            if HAS_MASK:
                visible = tl.load(visible_ptr + slots, mask=in_cache, other=0) != 0
            else:
                visible = slots <= last_visible
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

    @triton.jit
    def _merge_chunks_kernel(max_ptr, sum_ptr, acc_ptr, out_ptr, H: tl.constexpr, E: tl.constexpr,
                             CHUNKS: tl.constexpr, CHUNKS_PAD: tl.constexpr):
        """One query head: its chunks' partial softmaxes merged, each weighted by exp(its max − the overall
        max); a chunk with nothing visible has max -inf and weight 0 (the query's own slot is always visible,
        so the overall max is finite)."""
        head = tl.program_id(0)
        chunks = tl.arange(0, CHUNKS_PAD)
        dims = tl.arange(0, E)
        in_chunks = chunks < CHUNKS
        chunk_max = tl.load(max_ptr + chunks * H + head, mask=in_chunks, other=float("-inf"))
        chunk_sum = tl.load(sum_ptr + chunks * H + head, mask=in_chunks, other=0.0)
        acc = tl.load(acc_ptr + (chunks[:, None] * H + head) * E + dims[None, :], mask=in_chunks[:, None],
                      other=0.0)
        weights = tl.exp(chunk_max - tl.max(chunk_max, axis=0))
        out = tl.sum(weights[:, None] * acc, axis=0) / tl.sum(weights * chunk_sum, axis=0)
        tl.store(out_ptr + head * E + dims, out.to(out_ptr.dtype.element_ty))

    @torch.library.triton_op("genesis::flash_decode", mutates_args=())
    def flash_decode_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor | None,
                           position: torch.Tensor, chunk: int) -> torch.Tensor:
        """q (H, E), k and v (KH, L, E), visible (L,) bool or None for the slots up to `position` (1,) → the
        attention output (H, E) in q's dtype: a program per (key/value head, chunk of `chunk` slots), then one
        per query head merging the chunks.
        NOTE: the merge is a kernel of its own rather than torch ops after the op: Inductor made those two
        kernels a layer (2.4 µs, bench/decode_profile.py --kernels)."""
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
            q, k, v, position if visible is None else visible, position, running_max, running_sum, acc,
            SCALE=1.0 / math.sqrt(head_dim), L=cache_len, E=head_dim, G=group,
            G_PAD=max(16, triton.next_power_of_2(group)), CHUNK=chunk, BLOCK=ATTENTION_BLOCK,
            HAS_MASK=visible is not None, num_warps=4)
        out = torch.empty_like(q)
        torch.library.wrap_triton(_merge_chunks_kernel)[(n_heads,)](
            running_max, running_sum, acc, out, H=n_heads, E=head_dim, CHUNKS=chunks,
            CHUNKS_PAD=triton.next_power_of_2(chunks), num_warps=1)
        return out


def gemv_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (USE_GEMV and triton is not None and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
            and weight.dtype == x.dtype and x.shape[:-1].numel() == 1 and not torch.is_grad_enabled()
            and x.is_contiguous() and weight.is_contiguous())


def one_row_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`F.linear(x, weight)` (no bias); one row on a GPU outside autograd runs the Triton kernel."""
    if gemv_applies(x, weight):
        return gemv(x, weight, *gemv_config(*weight.shape))
    return F.linear(x, weight)


def fused_block_applies(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether a block's one-row step may run in `fused_gemv` kernels: the GEMV's conditions, for every weight
    (matrices and norm gains alike, all in x's dtype)."""
    return USE_FUSED_BLOCK and all(gemv_applies(x, weight) for weight in weights)


def norm_gemv(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
              gated: bool = False) -> torch.Tensor:
    """The kernel for `F.linear(rms_norm(x) · norm_weight, weight)`, or with `gated` SwiGLU's
    silu(gate) · up over weight's gate and up halves; for rows where `fused_block_applies`."""
    config = fused_gemv_config(True, gated, False, *weight.shape)
    return fused_gemv(x, weight, norm_weight, None, gated, eps, *config)


def gemv_add(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """The kernel for `residual + F.linear(x, weight)`; for rows where `fused_block_applies`."""
    config = fused_gemv_config(False, False, True, *weight.shape)
    return fused_gemv(x, weight, None, residual, False, 0.0, *config)


def rope_cache_applies(qkv: torch.Tensor, cos: torch.Tensor, k_cache: torch.Tensor, positions: torch.Tensor) -> bool:
    head_dim = k_cache.shape[-1]
    return (USE_ROPE_CACHE and triton is not None and qkv.is_cuda and qkv.dtype in (torch.bfloat16, torch.float16)
            and k_cache.dtype == qkv.dtype and qkv.shape[:-1].numel() == 1 and k_cache.shape[0] == 1
            and positions.numel() == 1 and qkv.is_contiguous() and k_cache.is_contiguous()
            and cos.dim() == 2 and cos.shape[1] == head_dim and cos.is_contiguous()
            and head_dim & (head_dim - 1) == 0 and not torch.is_grad_enabled())


def rope_and_cache(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                   k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
    """For qkv (1, 1, (H + 2·KH)·E) where `rope_cache_applies`: the rotated queries (1, H, 1, E); the rotated
    keys and the values written into k_cache and v_cache (1, KH, L, E) at `positions` (one). cos and sin are
    the whole rotary tables (positions, E): the kernel reads their rows at the position itself.
    NOTE: gathering the rows before the op made Inductor gather them again for every layer (12 kernels, 12 µs
    of an 863 µs step, bench/decode_profile.py)."""
    head_dim = k_cache.shape[-1]
    q = rope_and_cache_heads(qkv.reshape(-1), cos, sin, positions.reshape(1), k_cache, v_cache)
    return q.view(1, -1, 1, head_dim)


def causal_cache_mask(positions: torch.Tensor, cache_len: int) -> torch.Tensor:
    """(1, 1, T, cache_len) bool: the query at position p sees the cache slots 0 … p."""
    slots = torch.arange(cache_len, device=positions.device)
    return (slots <= positions[:, None])[None, None]


def attention_applies(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None) -> bool:
    head_dim = q.shape[-1]
    return (USE_FLASH_DECODE and triton is not None and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)
            and k.dtype == q.dtype and q.shape[0] == 1 and q.shape[2] == 1
            and (mask is None or (mask.numel() == k.shape[2] and mask.dtype == torch.bool))
            and q.shape[1] % k.shape[1] == 0 and head_dim >= 16 and head_dim & (head_dim - 1) == 0
            and not torch.is_grad_enabled())


def one_token_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                        positions: torch.Tensor) -> torch.Tensor:
    """`F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)` for q (B, H, T, E) at
    `positions` (T,) and k, v (B, KH, L, E), the cache; mask None is the causal one (`causal_cache_mask`). One
    query row (B = T = 1) on a GPU outside autograd runs flash-decoding in Triton."""
    if attention_applies(q, k, mask):
        return flash_decode(q, k, v, mask, positions)
    if mask is None:
        mask = causal_cache_mask(positions, k.shape[2])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def flash_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                 positions: torch.Tensor) -> torch.Tensor:
    """The Triton path of `one_token_attention` (q (1, H, 1, E), k and v (1, KH, L, E), mask of L booleans or
    None for the slots up to the one position).
    NOTE: a causal step gives its position, not a mask: a mask built once before the layers was built again
    by Inductor for every layer (20 kernels, 17 µs of an 863 µs step, bench/decode_profile.py)."""
    n_heads, head_dim = q.shape[1], q.shape[3]
    visible = None if mask is None else mask.reshape(-1).contiguous()
    out = flash_decode_heads(q.reshape(n_heads, head_dim).contiguous(), k[0].contiguous(), v[0].contiguous(),
                             visible, positions.reshape(1), attention_chunk(k.shape[2]))
    return out.view(1, n_heads, 1, head_dim)
