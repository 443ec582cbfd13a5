"""Specifications of Hugging Face interchange: exported models compute what the native model computes."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from genesis.config import ModelConfig, OptimizerConfig, load_model_config
from genesis.errors import CheckpointError
from genesis_model.hf import export_hf, import_hf
from genesis_model.model import Transformer
from genesis_model.optim import build_optimizer, lr_at

RANDOM_CONFIGS = [
    # (dim, layers, heads, kv heads, ffn, tied): MHA, GQA 2:1 and 4:1, MQA, odd sizes
    (64, 2, 4, 4, 96, True),
    (96, 3, 6, 3, 200, False),
    (128, 2, 8, 2, 344, True),
    (80, 2, 5, 1, 123, False),
]


@pytest.mark.parametrize("dim,layers,heads,kv_heads,ffn,tied", RANDOM_CONFIGS)
def test_exported_model_matches_native_logits_and_round_trips_bit_exactly(tmp_path, dim, layers, heads, kv_heads, ffn, tied):
    config = ModelConfig(vocab_size=331, dim=dim, n_layers=layers, n_heads=heads, n_kv_heads=kv_heads, ffn_dim=ffn,
                         max_seq_len=96, rope_theta=500_000.0, tie_embeddings=tied)
    native = Transformer(config)
    native.init_weights(seed=layers * 100 + heads)
    export_hf(native, tmp_path / "hf", dtype=torch.float32)

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32, attn_implementation="sdpa").eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    tokens = torch.randint(0, config.vocab_size, (3, 80), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = native(tokens)
        actual = hf(tokens).logits
    assert (actual - expected).abs().max().item() <= 1e-4

    back = import_hf(tmp_path / "hf")
    assert back.config.fingerprint() == config.fingerprint()
    for (name, a), b in zip(native.state_dict().items(), back.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_import_refuses_another_architecture_with_one_line(tmp_path):
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(CheckpointError) as err:
        import_hf(tmp_path / "gpt2")
    assert "gpt2" in str(err.value) and "LlamaForCausalLM" in str(err.value) and "\n" not in str(err.value)


def test_export_writes_tokenizer_files_and_replaces_an_old_export_only_when_complete(tmp_path):
    config = ModelConfig(vocab_size=50, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=48, max_seq_len=16)
    tokenizer_dir = tmp_path / "tok"
    tokenizer_dir.mkdir()
    (tokenizer_dir / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    out = export_hf(Transformer(config), tmp_path / "export", tokenizer_dir=tokenizer_dir)
    assert (out / "tokenizer_config.json").is_file() and (out / "model.safetensors").is_file()
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob("*.old"))
    assert json.loads((out / "genesis.json").read_text())["has_chat_template"] is True


@pytest.mark.slow
def test_tiny_model_trains_the_same_loss_curve_natively_and_as_hugging_face(tmp_path):
    """200 steps on CPU in fp32: same init, same batches, same AdamW and schedule, losses within 1%."""
    config = load_model_config("tiny")
    # NOTE: at lr 3e-3 this tiny run sits on a chaotic plateau where float rounding alone (HF and Genesis sum
    # in different orders) splits the curves by 2% around step 45; at 1e-3 they agree to ~1e-5 throughout.
    optimizer_config = OptimizerConfig(lr=1e-3, min_lr=1e-4, warmup_steps=20)
    steps, batch, seq = 200, 4, 64
    native = Transformer(config)
    native.init_weights(seed=0)
    export_hf(native, tmp_path / "hf", dtype=torch.float32)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32, attn_implementation="sdpa")

    # Learnable data: each row counts upward from a random start with a row-specific stride.
    generator = torch.Generator().manual_seed(0)
    starts = torch.randint(0, config.vocab_size, (steps, batch, 1), generator=generator)
    strides = torch.randint(1, 4, (steps, batch, 1), generator=generator)
    data = (starts + strides * torch.arange(seq + 1)) % config.vocab_size

    def train(model, forward_loss):
        optimizer = build_optimizer(model, optimizer_config, "cpu")
        losses = []
        for step in range(steps):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, optimizer_config, steps)
            loss = forward_loss(model, data[step][:, :-1], data[step][:, 1:])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        return losses

    native_losses = train(native, lambda m, x, y: m(x, y))
    hf_losses = train(hf, lambda m, x, y: F.cross_entropy(m(x).logits.flatten(0, 1), y.flatten()))
    for step, (a, b) in enumerate(zip(native_losses, hf_losses)):
        assert abs(a - b) / b <= 0.01, f"step {step}: native {a:.5f} vs HF {b:.5f}"
    assert native_losses[-1] < native_losses[0] - 1.0  # it actually learned (8.36 → 7.09)
