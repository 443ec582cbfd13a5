"""The Genesis decoder: a Llama-style transformer in one file.

Read top to bottom: RMSNorm, rotary embeddings, grouped-query attention, the SwiGLU MLP, a block, the model,
and the two methods callers need (`forward` for training and logits, `setup_kv_cache` for decoding). No
biases anywhere; the token embedding doubles as the output projection when `tie_embeddings` is set.

This file is single-device maths. FSDP2, torch.compile and activation checkpointing are applied from
`parallelize.py`; the loss lives in `loss.py` because its chunking is a memory trick, not modelling.
Matmuls and norms compute in their input's dtype, so fp32 weights can drive bf16 activations (`compute_dtype`).

Shapes: B batch, T sequence, D model dim, H query heads, K key/value heads, E head dim (D / H), V vocab.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from genesis.config import ModelConfig
from genesis_model.decode_kernels import (
    causal_cache_mask,
    fused_block_applies,
    gemv_add,
    norm_gemv,
    one_row_linear,
    one_token_attention,
    rope_and_cache,
    rope_cache_applies,
)
from genesis_model.loss import fused_linear_cross_entropy
from genesis_model.swiglu import swiglu


def weight_for_compute(layer: nn.Module) -> torch.Tensor:
    """The weight a layer computes with: its bf16 compute copy when one is attached, else the weight itself.

    A compute copy (`parallelize.attach_compute_copies`, one GPU without FSDP) is a bf16 twin of an fp32
    weight that the optimizer rewrites after each update; gradients land on the copy. The fp32 weight stays
    the model's parameter, so checkpoints and exports never see the copy.
    """
    copy = layer.compute_weight
    return layer.weight if copy is None else copy


class Linear(nn.Linear):
    """A bias-free linear layer that computes in its input's dtype.

    With bf16 weights (FSDP's mixed precision), a bf16 compute copy, or fp32 everywhere (CPU) the cast is a
    no-op. With fp32 weights and bf16 activations (one GPU without FSDP, see `Transformer.compute_dtype`) the
    weight is cast inside the compiled block, and its gradient comes back in fp32.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)
        self.register_buffer("compute_weight", None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A batch-1 decode step's one row may go to a matrix-vector kernel on a GPU (decode_kernels.USE_GEMV).
        return one_row_linear(x, weight_for_compute(self).to(x.dtype))


class Embedding(nn.Embedding):
    """Token embedding that looks up its compute copy when one is attached."""

    def __init__(self, num_embeddings: int, dim: int):
        super().__init__(num_embeddings, dim)
        self.register_buffer("compute_weight", None, persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, weight_for_compute(self))


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain. Computed in fp32 and cast back, exactly as Hugging Face's
    LlamaRMSNorm does, so exported models match to the last bit in fp32 and closely in bf16."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.register_buffer("compute_weight", None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight_for_compute(self).to(input_dtype) * x.to(input_dtype)


# -------------------------------------------------------------------------------------------------------------
# Rotary position embeddings.
# NOTE: we use the "rotate half" layout (the first half of each head's channels pairs with the second half),
# which is Hugging Face's Llama convention. Meta's original code pairs adjacent channels instead; using HF's
# layout natively means export needs no permutation of the q/k weights.


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape (max_seq_len, head_dim), in fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    positions = torch.arange(max_seq_len, dtype=torch.int64).float()
    freqs = torch.outer(positions, inv_freq)  # (T, E/2)
    angles = torch.cat((freqs, freqs), dim=-1)  # (T, E)
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, T, heads, E); cos/sin: (T, E) in fp32, cast to x's dtype first as HF does (the same in fp32,
    within rounding in bf16)."""
    cos, sin = cos.to(x.dtype)[:, None, :], sin.to(x.dtype)[:, None, :]  # broadcast over heads
    return x * cos + rotate_half(x) * sin


# -------------------------------------------------------------------------------------------------------------


class KVCache(nn.Module):
    """A static key/value cache: preallocated to the longest sequence, written in place at `positions`.
    Static shapes let the decode step be compiled once and replayed as a CUDA graph."""

    def __init__(self, batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        self.k.index_copy_(2, positions, k)
        self.v.index_copy_(2, positions, v)
        return self.k, self.v


class Attention(nn.Module):
    """Grouped-query attention: H query heads share K key/value heads (H / K queries per group)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        # NOTE: q, k and v come from one fused matmul (one kernel launch, better GPU utilisation); export
        # splits the weight into HF's q_proj/k_proj/v_proj rows in this order.
        qkv_out = (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
        self.wqkv = Linear(config.dim, qkv_out)
        self.wo = Linear(self.n_heads * self.head_dim, config.dim)
        self.kv_cache: KVCache | None = None

    def forward(self, x, cos, sin, positions=None, mask=None):
        return self.wo(self.attend(self.wqkv(x), cos, sin, positions, mask))

    def attend(self, qkv, cos, sin, positions=None, mask=None):
        """The fused projection's q, k, v (B, T, (H + 2K)·E) → the heads' outputs (B, T, H·E), before `wo`.
        Without `positions` (training), cos and sin are the tables' first T rows; with them (decoding with the
        cache), the whole tables, and a mask of None is the causal one over the cache."""
        B, T, _ = qkv.shape
        q_size, kv_size = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        cache = self.kv_cache
        if cache is not None and rope_cache_applies(qkv, cos, cache.k, positions):
            # A batch-1 step on a GPU: the rotations and the cache writes in one kernel (decode_kernels).
            q = rope_and_cache(qkv, cos, sin, positions, cache.k, cache.v)
            y = one_token_attention(q, cache.k, cache.v, mask, positions)
            return y.transpose(1, 2).reshape(B, T, q_size)
        if positions is not None:
            cos, sin = cos[positions], sin[positions]
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = apply_rope(q.view(B, T, self.n_heads, self.head_dim), cos, sin)
        k = apply_rope(k.view(B, T, self.n_kv_heads, self.head_dim), cos, sin)
        # NOTE: attention keeps q, k, v and its output for backward. `v` is copied out of the fused qkv
        # result so that keeping it does not keep the whole (B, T, (H + 2K)·E) buffer alive.
        v = v.contiguous().view(B, T, self.n_kv_heads, self.head_dim)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, E) views for SDPA

        if self.kv_cache is not None:
            # Decoding: attend over the whole static cache; `mask` (None: the causal one) hides the positions
            # not yet written.
            # A batch-1 step's one query may run flash-decoding on a GPU (decode_kernels.USE_FLASH_DECODE).
            # NOTE: measured on an H200 (bench/generate.py, BENCHMARKS "Generation"): folding each key/value
            # head's query group into its rows and writing the one-token step's attention out as two products
            # and a softmax gave +0.6% at batch 1 and -6.5% / -4.4% at batch 8 / 32 against SDPA.
            k, v = self.kv_cache.update(positions, k, v)
            y = one_token_attention(q, k, v, mask, positions)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return y.transpose(1, 2).reshape(B, T, q_size)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(x·w1) * (x·w3)), with w1 and w3 fused into one matmul (gate rows first)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.w13 = Linear(config.dim, 2 * config.ffn_dim)
        self.w2 = Linear(config.ffn_dim, config.dim)

    def forward(self, x):
        return self.w2(swiglu(self.w13(x)))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(self, x, cos, sin, positions=None, mask=None):
        if positions is not None and fused_block_applies(x, *self.one_row_weights()):
            return self.forward_one_row(x, cos, sin, positions, mask)
        x = x + self.attention(self.attention_norm(x), cos, sin, positions, mask)
        return x + self.feed_forward(self.ffn_norm(x))

    def one_row_weights(self) -> tuple[torch.Tensor, ...]:
        attention, feed_forward = self.attention, self.feed_forward
        return tuple(weight_for_compute(layer) for layer in (
            self.attention_norm, attention.wqkv, attention.wo, self.ffn_norm, feed_forward.w13, feed_forward.w2))

    def forward_one_row(self, x, cos, sin, positions, mask):
        """`forward` for a batch-1 decode step on a GPU (decode_kernels.USE_FUSED_BLOCK): the same maths in
        four matrix-vector kernels that carry the small ops between them (each norm in the product after it,
        SwiGLU in w13's, each residual add in wo's and w2's), since at one row a kernel launch costs about what
        the small op's bytes do."""
        attention_norm, wqkv, wo, ffn_norm, w13, w2 = self.one_row_weights()
        qkv = norm_gemv(x, attention_norm, self.attention_norm.eps, wqkv)
        x = gemv_add(self.attention.attend(qkv, cos, sin, positions, mask), wo, x)
        hidden = norm_gemv(x, ffn_norm, self.ffn_norm.eps, w13, gated=True)
        return gemv_add(hidden, w2, x)


class Transformer(nn.Module):
    # The activations' dtype when it differs from the weights' (None: the weights' dtype). Set by
    # parallelize.py for one GPU without FSDP: fp32 master weights, bf16 activations, the same maths as FSDP's
    # bf16 parameter policy.
    compute_dtype: torch.dtype | None = None

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = Embedding(config.vocab_size, config.dim)
        # NOTE: a ModuleDict keyed "0".."L-1" rather than a ModuleList keeps layer names stable when
        # parallelize.py wraps blocks (compile, checkpointing), so checkpoints stay loadable either way.
        self.layers = nn.ModuleDict({str(i): Block(config) for i in range(config.n_layers)})
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = None if config.tie_embeddings else Linear(config.dim, config.vocab_size)
        cos, sin = rope_tables(config.head_dim, config.max_seq_len, config.rope_theta)
        # Non-persistent: derived from the config, so never saved, and recomputed exactly by `init_weights`.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()

    @property
    def output_weight(self) -> torch.Tensor:
        """(V, D): the projection to logits, shared with the embedding when tied."""
        return self.tok_embeddings.weight if self.output is None else self.output.weight

    @property
    def output_weight_for_compute(self) -> torch.Tensor:
        return weight_for_compute(self.tok_embeddings if self.output is None else self.output)

    def init_weights(self, seed: int | None = None) -> None:
        """Deterministic scaled init (GPT-2 / OLMo style).

        Every matrix is N(0, init_std) truncated at ±3σ, except the two projections that write into the
        residual stream (attention `wo`, MLP `w2`), which get init_std / sqrt(2 · n_layers): each block adds
        two such terms, so this keeps the residual's variance roughly constant with depth. Norm gains start
        at 1. The tied embedding uses init_std too, which keeps initial logits near zero (loss ≈ ln V).
        With a seed, parameters are drawn from a private generator in a fixed order, so the same seed gives
        the same model whatever the device or the global RNG state.
        """
        if self.tok_embeddings.weight.device.type == "meta":
            return  # shapes only (parameter counting, or FSDP building before materialising)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.config.init_std
        residual_std = std / math.sqrt(2 * self.config.n_layers)
        with torch.no_grad():
            for name, param in self.named_parameters():
                if name.endswith("norm.weight"):
                    param.fill_(1.0)
                    continue
                scale = residual_std if name.endswith(("wo.weight", "w2.weight")) else std
                values = torch.empty(param.shape, dtype=torch.float32)
                nn.init.trunc_normal_(values, 0.0, scale, -3 * scale, 3 * scale, generator=generator)
                param.copy_(values)
        self.reset_rope_tables()

    def reset_rope_tables(self) -> None:
        """Recompute the rotary tables in place (after `to_empty` materialises a model built on meta)."""
        cos, sin = rope_tables(self.config.head_dim, self.config.max_seq_len, self.config.rope_theta)
        with torch.no_grad():
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(
        self,
        tokens: torch.Tensor,
        targets: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        ignore_index: int = -100,
        slot_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens (B, T) → logits (B, T, V) in fp32, or the mean cross-entropy if `targets` is given.

        With `targets`, the logits are never materialised for the whole batch (see loss.py). `positions`
        (T,) is for decoding with a KV cache (`setup_kv_cache`); training leaves it None. `slot_mask`
        (B, cache length), bool, marks the cache slots each row may attend to when prompts of different
        lengths are decoded together left-padded (False on the padding).
        """
        x = self.hidden_states(tokens, positions, slot_mask)
        if targets is not None:
            # The loss casts the weight itself, so its gradient comes back in the weight's dtype (fp32 masters).
            return fused_linear_cross_entropy(x.flatten(0, 1), self.output_weight_for_compute, targets.flatten(),
                                              ignore_index)
        return one_row_linear(x, self.output_weight_for_compute.to(x.dtype)).float()

    def hidden_states(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                      slot_mask: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, T) → the final norm's output (B, T, D): everything but the output projection.
        (`parallelize.py` may compile this whole method as one graph.)"""
        T = tokens.shape[1]
        if positions is None:
            if T > self.config.max_seq_len:
                raise ValueError(f"sequence of {T} tokens exceeds the context length {self.config.max_seq_len}")
            cos, sin, mask = self.rope_cos[:T], self.rope_sin[:T], None
        else:
            # Decoding: the whole rotary tables and, without a slot mask, no mask go down to the layers; each
            # takes the rows at `positions` and the causal mask itself, where it needs them. NOTE: the batch-1
            # kernels read the position alone. Rows and mask built here once were built again by Inductor for
            # every layer: 32 kernels of an 863 µs step (decode_kernels.rope_and_cache, flash_decode).
            cos, sin, mask = self.rope_cos, self.rope_sin, None
            if slot_mask is not None:
                # (B, 1, T, max_len): causal, and only its own row's real slots. A padding query still sees
                # itself, so that no row of the softmax is empty (an all-masked row is NaN, and NaN values written to
                # the cache would poison every later query through 0 · NaN).
                slots = torch.arange(self.kv_cache_len, device=tokens.device)
                mask = causal_cache_mask(positions, self.kv_cache_len) & (
                    slot_mask[:, None, None, :] | (slots == positions[:, None])[None, None])

        x = self.tok_embeddings(tokens)  # (B, T, D)
        if self.compute_dtype is not None:
            x = x.to(self.compute_dtype)
        for block in self.layers.values():
            x = block(x, cos, sin, positions, mask)
        return self.norm(x)

    # ---------------------------------------------------------------------------------------------------------
    # Decoding

    kv_cache_len: int = 0

    def setup_kv_cache(self, batch_size: int, max_seq_len: int | None = None) -> None:
        """Allocate a static KV cache in every attention layer (dtype and device of the weights)."""
        max_seq_len = max_seq_len or self.config.max_seq_len
        weight = self.tok_embeddings.weight
        dtype = self.compute_dtype or weight.dtype
        self.kv_cache_len = max_seq_len
        for block in self.layers.values():
            block.attention.kv_cache = KVCache(
                batch_size, max_seq_len, self.config.n_kv_heads, self.config.head_dim, dtype, weight.device
            )

    def clear_kv_cache(self) -> None:
        self.kv_cache_len = 0
        for block in self.layers.values():
            block.attention.kv_cache = None
