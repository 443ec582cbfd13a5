"""Hugging Face interchange: native Genesis weights <-> a `transformers` `LlamaForCausalLM` directory.

The native model already uses HF's rotate-half RoPE layout, so the mapping is renames plus two splits: the
fused `wqkv` rows are [q | k | v] and the fused `w13` rows are [gate | up]. Both directions copy tensors
exactly, so native → HF → native is bit-exact.

A directory is written under a temporary name and renamed into place when complete, so a crash never
leaves something that looks like a finished export.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from genesis.config import ModelConfig
from genesis.errors import CheckpointError
from genesis.run_dir import EXPORT_MARKER
from genesis_model.model import Transformer

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
)


def hf_config_dict(config: ModelConfig, bos_id: int = 1, eos_id: int = 2, pad_id: int | None = None) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "intermediate_size": config.ffn_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "tie_word_embeddings": config.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": config.init_std,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
    }


def model_config_from_hf(hf_config, source: str) -> ModelConfig:
    """Read a Llama-architecture HF config back into a ModelConfig; refuse anything else."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type != "llama":
        raise CheckpointError(
            f"{source}: model_type '{model_type}' is not a Llama architecture; import-hf reads LlamaForCausalLM only"
        )
    if getattr(hf_config, "attention_bias", False) or getattr(hf_config, "mlp_bias", False):
        raise CheckpointError(f"{source}: attention/MLP biases are not supported; Genesis models have no biases")
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        raise CheckpointError(f"{source}: hidden_act '{hf_config.hidden_act}' is not silu (SwiGLU)")
    rope = getattr(hf_config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise CheckpointError(f"{source}: rope_type '{rope.get('rope_type')}' is not supported; plain RoPE only")
    theta = rope.get("rope_theta", getattr(hf_config, "rope_theta", 10_000.0))
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    if head_dim * hf_config.num_attention_heads != hf_config.hidden_size:
        raise CheckpointError(f"{source}: head_dim × heads ≠ hidden_size; Genesis needs dim = heads × head_dim")
    return ModelConfig(
        name=Path(source).name,
        vocab_size=hf_config.vocab_size,
        dim=hf_config.hidden_size,
        n_layers=hf_config.num_hidden_layers,
        n_heads=hf_config.num_attention_heads,
        n_kv_heads=hf_config.num_key_value_heads,
        ffn_dim=hf_config.intermediate_size,
        max_seq_len=hf_config.max_position_embeddings,
        rope_theta=float(theta),
        norm_eps=hf_config.rms_norm_eps,
        tie_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        init_std=getattr(hf_config, "initializer_range", 0.02),
    )


def native_to_hf_state_dict(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    q_size, kv_size = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    out = {"model.embed_tokens.weight": state["tok_embeddings.weight"], "model.norm.weight": state["norm.weight"]}
    if not config.tie_embeddings:
        out["lm_head.weight"] = state["output.weight"]
    for i in range(config.n_layers):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        q, k, v = state[src + "attention.wqkv.weight"].split([q_size, kv_size, kv_size], dim=0)
        gate, up = state[src + "feed_forward.w13.weight"].split(config.ffn_dim, dim=0)
        out |= {
            dst + "input_layernorm.weight": state[src + "attention_norm.weight"],
            dst + "self_attn.q_proj.weight": q,
            dst + "self_attn.k_proj.weight": k,
            dst + "self_attn.v_proj.weight": v,
            dst + "self_attn.o_proj.weight": state[src + "attention.wo.weight"],
            dst + "post_attention_layernorm.weight": state[src + "ffn_norm.weight"],
            dst + "mlp.gate_proj.weight": gate,
            dst + "mlp.up_proj.weight": up,
            dst + "mlp.down_proj.weight": state[src + "feed_forward.w2.weight"],
        }
    return {name: tensor.contiguous() for name, tensor in out.items()}


def hf_to_native_state_dict(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    out = {"tok_embeddings.weight": state["model.embed_tokens.weight"], "norm.weight": state["model.norm.weight"]}
    if not config.tie_embeddings:
        out["output.weight"] = state.get("lm_head.weight", state["model.embed_tokens.weight"])
    for i in range(config.n_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        attn, mlp = src + "self_attn.", src + "mlp."
        out |= {
            dst + "attention_norm.weight": state[src + "input_layernorm.weight"],
            dst + "attention.wqkv.weight": torch.cat(
                [state[attn + "q_proj.weight"], state[attn + "k_proj.weight"], state[attn + "v_proj.weight"]]
            ),
            dst + "attention.wo.weight": state[attn + "o_proj.weight"],
            dst + "ffn_norm.weight": state[src + "post_attention_layernorm.weight"],
            dst + "feed_forward.w13.weight": torch.cat([state[mlp + "gate_proj.weight"], state[mlp + "up_proj.weight"]]),
            dst + "feed_forward.w2.weight": state[mlp + "down_proj.weight"],
        }
    return out


def _replace_dir(tmp_dir: Path, out_dir: Path) -> None:
    """Move a finished temporary directory into place; an existing export is replaced only at the end."""
    if out_dir.exists():
        old = out_dir.with_name(out_dir.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
        os.replace(tmp_dir, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp_dir, out_dir)


def export_hf(
    model: Transformer,
    out_dir: str | Path,
    tokenizer_dir: str | Path | None = None,
    dtype: torch.dtype = torch.bfloat16,
    extra_metadata: dict | None = None,
) -> Path:
    """Write `model` as a LlamaForCausalLM directory (config.json, model.safetensors, tokenizer files).

    The weights are stored in `dtype` (bf16 by default, as trained; fp32 for exact parity checks).
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir()

    config = model.config
    native = {name: tensor.detach().to("cpu", dtype) for name, tensor in model.state_dict().items()}
    hf_state = native_to_hf_state_dict(native, config)
    if config.tie_embeddings:
        hf_state.pop("lm_head.weight", None)
    save_file(hf_state, str(tmp_dir / "model.safetensors"), metadata={"format": "pt"})

    tokenizer_info = {}
    if tokenizer_dir is not None:
        tokenizer_dir = Path(tokenizer_dir)
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).is_file():
                shutil.copy2(tokenizer_dir / name, tmp_dir / name)
        special = tokenizer_dir / "tokenizer_config.json"
        if special.is_file():
            tokenizer_info = json.loads(special.read_text())
    bos_id, eos_id, pad_id = _special_ids(tokenizer_dir)
    hf_config = hf_config_dict(config, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id)
    hf_config["torch_dtype"] = str(dtype).removeprefix("torch.")
    (tmp_dir / "config.json").write_text(json.dumps(hf_config, indent=2))
    generation = {"bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id}
    (tmp_dir / "generation_config.json").write_text(json.dumps(generation, indent=2))
    metadata = {"genesis_model_config": config.model_dump(), **(extra_metadata or {})}
    if tokenizer_info.get("chat_template"):
        metadata["has_chat_template"] = True
    (tmp_dir / EXPORT_MARKER).write_text(json.dumps(metadata, indent=2, default=str))
    _replace_dir(tmp_dir, out_dir)
    return out_dir


def _special_ids(tokenizer_dir: Path | None) -> tuple[int, int, int | None]:
    """bos/eos/pad ids: from the tokenizer's genesis metadata when present, else SentencePiece defaults."""
    if tokenizer_dir is not None and (Path(tokenizer_dir) / "genesis_tokenizer.json").is_file():
        info = json.loads((Path(tokenizer_dir) / "genesis_tokenizer.json").read_text())
        return info["bos_id"], info["chat_eos_id"], info.get("pad_id")
    return 1, 2, None


def import_hf(hf_dir: str | Path, dtype: torch.dtype = torch.float32) -> Transformer:
    """Read a Llama-architecture HF directory into the native model."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise CheckpointError(f"{hf_dir}: no config.json; pass a Hugging Face model directory")
    config = model_config_from_hf(AutoConfig.from_pretrained(hf_dir), str(hf_dir))
    shards = sorted(hf_dir.glob("*.safetensors"))
    if not shards:
        raise CheckpointError(f"{hf_dir}: no *.safetensors weights; re-save the model with safe_serialization")
    hf_state: dict[str, torch.Tensor] = {}
    for shard in shards:
        hf_state |= load_file(str(shard))
    try:
        native = hf_to_native_state_dict(hf_state, config)
    except KeyError as missing:
        raise CheckpointError(f"{hf_dir}: weight {missing} missing; the directory is not a complete Llama model")
    with torch.device("meta"):
        model = Transformer(config)
    model = model.to_empty(device="cpu")
    model.load_state_dict({k: v.to(dtype) for k, v in native.items()}, strict=True)
    model.reset_rope_tables()
    return model.to(dtype)
