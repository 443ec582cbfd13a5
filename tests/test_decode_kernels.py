"""The batch-1 decode kernels (genesis_model/decode_kernels.py) compute what F.linear and SDPA compute.

The kernels are Triton; this box has no GPU, so they run in Triton's CPU interpreter (TRITON_INTERPRET=1, which
Triton reads when a kernel is defined: hence a fresh interpreter process per check). On a GPU they are timed and
checked end to end by bench/gemv.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from genesis_model import decode_kernels

REPO = Path(__file__).resolve().parent.parent


def run_interpreted(code: str) -> dict:
    """Run `code` (which prints one JSON line last) with the kernels in Triton's interpreter."""
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_triton_is_installed_so_the_kernels_are_tested_here_and_a_cpu_process_leaves_it_alone():
    # CPU torch wheels do not bring Triton; the dev extra does, for the interpreter.
    assert importlib.util.find_spec("triton") is not None
    assert decode_kernels.triton is None


def test_the_gemv_kernel_matches_an_fp32_product_on_ragged_shapes():
    errors = run_interpreted("""
        import json, torch, torch.nn.functional as F
        from genesis_model import decode_kernels as dk
        torch.manual_seed(0)
        errors = []
        # rows not a multiple of the rows per program, inner dimensions not a multiple of the chunk
        for (n, k), config in [((200, 96), (1, 64, 4)), ((37, 130), (4, 64, 4)), ((64, 512), (2, 1024, 8))]:
            weight = torch.randn(n, k, dtype=torch.bfloat16) * k ** -0.5
            x = torch.randn(1, 1, k, dtype=torch.bfloat16)
            out = dk.gemv(x, weight, *config)
            assert out.shape == (1, 1, n) and out.dtype == torch.bfloat16
            errors.append((out.float() - F.linear(x.float(), weight.float())).abs().max().item())
        print(json.dumps(errors))
    """)
    # the products are within bf16's rounding of the output (values of order 1: 2^-8 relative)
    assert max(errors) < 0.02


def test_the_fused_gemv_computes_the_norm_the_swiglu_and_the_residual_add_the_plain_ops_do():
    errors = run_interpreted("""
        import json, torch, torch.nn.functional as F
        from genesis_model import decode_kernels as dk
        torch.manual_seed(0)

        def rms_norm(x, gain, eps):  # as model.RMSNorm: in fp32, then cast back, then the gain
            normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
            return gain * normed.to(x.dtype)

        def error(out, reference):  # relative to the output's scale
            return ((out.float() - reference.float()).abs().max() / reference.float().abs().max()).item()

        errors = {}
        k, n, eps = 130, 37, 1e-5  # ragged against the chunk of 64 and the 2 rows per program
        x = torch.randn(1, 1, k, dtype=torch.bfloat16) * 3
        gain = (1 + 0.5 * torch.randn(k)).to(torch.bfloat16)
        weight = torch.randn(n, k, dtype=torch.bfloat16) * k ** -0.5
        gated_weight = torch.randn(2 * n, k, dtype=torch.bfloat16) * k ** -0.5
        residual = torch.randn(1, 1, n, dtype=torch.bfloat16)
        config = (2, 64, 4)
        out = dk.fused_gemv(x, weight, gain, None, False, eps, *config)
        errors["norm"] = error(out, F.linear(rms_norm(x, gain, eps), weight))
        out = dk.fused_gemv(x, gated_weight, gain, None, True, eps, *config)
        gate, up = F.linear(rms_norm(x, gain, eps), gated_weight).split(n, dim=-1)
        assert out.shape == (1, 1, n)
        errors["norm_swiglu"] = error(out, F.silu(gate) * up)
        out = dk.fused_gemv(x, weight, None, residual, False, 0.0, *config)
        errors["residual"] = error(out, residual + F.linear(x, weight))
        print(json.dumps(errors))
    """)
    # a few bf16 roundings (2^-8 each, relative); the norm's product rounds once less than the plain ops do
    assert all(error < 0.02 for error in errors.values()), errors


def test_the_rope_and_cache_kernel_rotates_as_the_model_and_writes_one_slot_of_each_cache():
    result = run_interpreted("""
        import json, torch
        from genesis_model import decode_kernels as dk
        from genesis_model.model import apply_rope, rope_tables
        torch.manual_seed(0)
        # NOTE: fp16, not bf16: Triton's interpreter truncates fp32 to bf16 where a GPU rounds to nearest, so
        # only in fp16 do the kernel's roundings and the plain ops' meet bit for bit here.
        heads, kv_heads, dim, length, position = 6, 2, 16, 12, 7
        cos, sin = rope_tables(dim, length, 500_000.0)
        qkv = torch.randn(1, 1, (heads + 2 * kv_heads) * dim, dtype=torch.float16)
        k_cache = torch.randn(1, kv_heads, length, dim, dtype=torch.float16)
        v_cache = torch.randn(1, kv_heads, length, dim, dtype=torch.float16)
        expected_k, expected_v = k_cache.clone(), v_cache.clone()
        positions = torch.tensor([position])
        q = dk.rope_and_cache(qkv, cos, sin, positions, k_cache, v_cache)  # the whole tables: it reads the row

        q_plain, k_plain, v_plain = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
        q_plain = apply_rope(q_plain.view(1, 1, heads, dim), cos[positions], sin[positions]).transpose(1, 2)
        k_plain = apply_rope(k_plain.view(1, 1, kv_heads, dim), cos[positions], sin[positions]).transpose(1, 2)
        expected_k.index_copy_(2, positions, k_plain)
        expected_v.index_copy_(2, positions, v_plain.view(1, 1, kv_heads, dim).transpose(1, 2))
        print(json.dumps({"q": torch.equal(q, q_plain), "k": torch.equal(k_cache, expected_k),
                          "v": torch.equal(v_cache, expected_v), "q_shape": list(q.shape)}))
    """)
    # the same roundings as the plain ops: bit for bit, and the other slots untouched
    assert result == {"q": True, "k": True, "v": True, "q_shape": [1, 6, 1, 16]}


def test_a_blocks_one_row_path_decodes_as_its_plain_forward():
    result = run_interpreted("""
        import json, torch
        from genesis.config import ModelConfig
        from genesis_model.model import Transformer
        config = ModelConfig(vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=160,
                             max_seq_len=32)
        model = Transformer(config)
        model.init_weights(seed=0)
        with torch.no_grad():  # gains away from 1, so that a kernel that skipped them would show
            for block in model.layers.values():
                block.attention_norm.weight.normal_(1.0, 0.3)
                block.ffn_norm.weight.normal_(1.0, 0.3)
        model = model.to(torch.bfloat16)
        model.setup_kv_cache(batch_size=1, max_seq_len=32)
        with torch.inference_mode():
            prompt = torch.randint(3, 96, (1, 9))
            model(prompt, positions=torch.arange(9))
            position = torch.tensor([9])
            # decoding hands the layers the whole rotary tables and no mask (the causal one)
            cos, sin = model.rope_cos, model.rope_sin
            x = model.tok_embeddings(torch.tensor([[7]]))
            errors = []
            for block in model.layers.values():
                plain = block(x, cos, sin, position, None)
                fused = block.forward_one_row(x, cos, sin, position, None)
                errors.append((fused - plain).float().abs().max().item() / plain.float().abs().max().item())
                x = plain
        print(json.dumps(errors))
    """)
    assert max(result) < 0.02, result


def test_flash_decoding_matches_sdpa_for_grouped_queries_and_any_visible_slots_or_a_causal_position():
    errors = run_interpreted("""
        import json, torch, torch.nn.functional as F
        from genesis_model import decode_kernels as dk
        torch.manual_seed(0)
        errors = {}
        cases = {
            # query heads, key/value heads, head dim, cache length, the visible slots (a mask), or the
            # position whose slots up to it are visible (no mask: the kernel compares the slots to it)
            "first_slot_only": (8, 2, 32, 100, torch.arange(100) <= 0),
            "causal_at_position_0": (8, 2, 32, 100, 0),
            "causal_at_position_70_across_chunks": (8, 2, 32, 100, 70),
            "causal_at_the_last_slot": (4, 2, 16, 1100, 1099),
            "causal_prefix_across_chunks": (8, 2, 32, 100, torch.arange(100) <= 70),
            "whole_cache": (4, 4, 16, 64, torch.ones(64, dtype=torch.bool)),
            "three_queries_per_group": (6, 2, 16, 50, torch.arange(50) <= 33),
            "left_padding_holes": (8, 1, 32, 80, (torch.arange(80) >= 20) & (torch.arange(80) <= 60)),
            # chunks of 64 slots: two blocks each, the running max rescaled within a program
            "long_cache": (4, 2, 16, 1100, torch.arange(1100) <= 1000),
        }
        for name, (heads, kv_heads, dim, length, visible) in cases.items():
            q = torch.randn(1, heads, 1, dim, dtype=torch.bfloat16)
            k = torch.randn(1, kv_heads, length, dim, dtype=torch.bfloat16)
            v = torch.randn(1, kv_heads, length, dim, dtype=torch.bfloat16)
            position = torch.tensor([visible if isinstance(visible, int) else length - 1])
            mask = None if isinstance(visible, int) else visible[None, None, None]
            out = dk.flash_decode(q, k, v, mask, position)
            if mask is None:
                mask = dk.causal_cache_mask(position, length)
            assert out.shape == q.shape and out.dtype == q.dtype
            reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                                       enable_gqa=True)
            errors[name] = (out.float() - reference).abs().max().item()
        print(json.dumps(errors))
    """)
    assert all(error < 0.02 for error in errors.values()), errors


def test_the_cache_is_cut_into_chunks_of_whole_blocks_about_32_of_them():
    assert decode_kernels.attention_chunk(384) == 32  # 12 chunks
    assert decode_kernels.attention_chunk(2048) == 64  # 32 chunks
    assert decode_kernels.attention_chunk(40) == 32
    for length in (1, 100, 384, 2048, 4097):
        chunk = decode_kernels.attention_chunk(length)
        assert chunk % decode_kernels.ATTENTION_BLOCK == 0
        assert -(-length // chunk) <= decode_kernels.ATTENTION_TARGET_CHUNKS


def test_on_the_cpu_the_plain_ops_run():
    x, weight = torch.randn(1, 1, 64, dtype=torch.bfloat16), torch.randn(32, 64, dtype=torch.bfloat16)
    assert not decode_kernels.gemv_applies(x, weight)
    assert torch.equal(decode_kernels.one_row_linear(x, weight), torch.nn.functional.linear(x, weight))
    q, k = torch.randn(1, 4, 1, 16, dtype=torch.bfloat16), torch.randn(1, 2, 32, 16, dtype=torch.bfloat16)
    assert not decode_kernels.attention_applies(q, k, torch.ones(1, 1, 1, 32, dtype=torch.bool))
    assert not decode_kernels.fused_block_applies(x, weight)
    qkv, cache = torch.randn(1, 1, 128, dtype=torch.bfloat16), torch.zeros(1, 2, 32, 16, dtype=torch.bfloat16)
    cos = torch.ones(32, 16)
    assert not decode_kernels.rope_cache_applies(qkv, cos, cache, torch.tensor([3]))
    # without a mask, the causal one over the cache at the position: the same as SDPA's with it
    v = torch.randn(1, 2, 32, 16, dtype=torch.bfloat16)
    position = torch.tensor([5])
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=(torch.arange(32) <= 5)[None, None, None], enable_gqa=True)
    assert torch.equal(decode_kernels.one_token_attention(q, k, v, None, position), expected)


def test_the_switches_are_set_for_a_block_and_restored_after_it_and_a_misspelt_one_is_refused():
    before = {name: getattr(decode_kernels, name) for name in decode_kernels.SWITCHES}
    with decode_kernels.switched(USE_GEMV=False, USE_ROPE_CACHE=False):
        assert not decode_kernels.USE_GEMV and not decode_kernels.USE_ROPE_CACHE
        assert decode_kernels.USE_FLASH_DECODE == before["USE_FLASH_DECODE"]
    assert {name: getattr(decode_kernels, name) for name in decode_kernels.SWITCHES} == before
    with pytest.raises(ValueError, match="USE_GEMM"):
        with decode_kernels.switched(USE_GEMM=False):
            pass
    assert {name: getattr(decode_kernels, name) for name in decode_kernels.SWITCHES} == before
