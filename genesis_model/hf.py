"""Hugging Face interchange: native Genesis weights <-> a `transformers` `LlamaForCausalLM` directory.

The native model already uses HF's rotate-half RoPE layout, so the mapping is renames plus two splits: the
fused `wqkv` rows are [q | k | v] and the fused `w13` rows are [gate | up]. Both directions copy tensors
exactly, so native → HF → native is bit-exact.

A directory is written under a temporary name and renamed into place when complete, so a crash never
leaves something that looks like a finished export. Every directory Genesis writes (export-hf, a branch's base,
SFT, DPO) is finished by `complete_export_dir`, so each consumer reads the same tokenizer the model was trained
with: transformers (5.x and the 4.56 lower bound), llama.cpp's own converter and `genesis export-gguf`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from genesis.chat import BOS, CHAT_TEMPLATE, IM_END, PAD, UNK, chat_template, is_genesis_chat_template
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


# The tokenizer_config.json keys `complete_export_dir` writes; anything else a library saved is dropped (transformers
# 5.x writes keys, such as a list-valued `extra_special_tokens`, that 4.x cannot read).
TOKENIZER_CONFIG_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "model_max_length")


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
    complete_export_dir(tmp_dir)
    metadata = {"genesis_model_config": config.model_dump(), **(extra_metadata or {})}
    if tokenizer_info.get("chat_template"):
        metadata["has_chat_template"] = True
    (tmp_dir / EXPORT_MARKER).write_text(json.dumps(metadata, indent=2, default=str))
    _replace_dir(tmp_dir, out_dir)
    return out_dir


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _chat_template_of(directory: Path) -> str | None:
    if (directory / "chat_template.jinja").is_file():
        return (directory / "chat_template.jinja").read_text()
    return _read_json(directory / "tokenizer_config.json").get("chat_template")


def sentencepiece_adds_dummy_prefix(model_path: Path) -> bool:
    """Whether the SentencePiece model prepends a space ("▁") to every text (Genesis's tokenizers do not)."""
    import sentencepiece as spm

    pieces = spm.SentencePieceProcessor(model_file=str(model_path)).encode("x", out_type=str)
    return "".join(pieces).startswith("\u2581")


def complete_export_dir(directory: str | Path, tokenizer_source: str | Path | None = None,
                        system_prompt: str | None = None) -> Path:
    """Make a Hugging Face model directory complete for every consumer, in place (call it on the temporary
    directory before it is renamed into place):

      * `tokenizer.model` (the SentencePiece model: llama.cpp's scores) and `tokenizer.json`, copied from
        `tokenizer_source` (the directory the model's tokenizer came from) when it has them;
      * `tokenizer_config.json` rewritten with only keys every transformers version reads: the class
        `PreTrainedTokenizerFast`, `added_tokens_decoder` (the chat markers marked special, so llama.cpp's
        converter makes them control tokens), `add_bos_token`/`add_eos_token` false, `add_prefix_space` as the
        SentencePiece model has it (false for Genesis's), the special tokens and the chat template;
      * the chat template (also `chat_template.jinja`) carrying `system_prompt`, the one the model was tuned
        with, as its default;
      * `config.json` with `rope_theta` beside `rope_parameters` (transformers 4.x reads only the former and would
        silently use θ = 10,000).

    A directory without `tokenizer.json` (a weights-only export) gets only the config fix.
    """
    directory = Path(directory)
    source = Path(tokenizer_source) if tokenizer_source is not None else None
    if source is not None and source.resolve() != directory.resolve():
        for name in ("tokenizer.model", "tokenizer.json"):
            if (source / name).is_file():
                shutil.copy2(source / name, directory / name)
    _complete_model_config(directory)
    if not (directory / "tokenizer.json").is_file():
        return directory

    tokenizer_json = json.loads((directory / "tokenizer.json").read_text())
    added = sorted(tokenizer_json.get("added_tokens", []), key=lambda token: token["id"])
    added_tokens_decoder = {
        str(token["id"]): {key: token.get(key, default) for key, default in
                           (("content", ""), ("lstrip", False), ("normalized", False), ("rstrip", False),
                            ("single_word", False), ("special", False))}
        for token in added
    }
    previous = _read_json(directory / "tokenizer_config.json") or (
        _read_json(source / "tokenizer_config.json") if source is not None else {})
    template = _chat_template_of(directory) or (_chat_template_of(source) if source is not None else None)
    if system_prompt and (template is None or is_genesis_chat_template(template)):
        # NOTE: only Genesis's own template gets the default; someone else's cannot take it safely and stays.
        template = chat_template(system_prompt)
    if template is None and any(token["content"] == IM_END for token in added):
        template = CHAT_TEMPLATE
    spm_model = directory / "tokenizer.model"
    dummy_prefix = sentencepiece_adds_dummy_prefix(spm_model) if spm_model.is_file() else False
    defaults = {"bos_token": BOS, "eos_token": IM_END, "unk_token": UNK, "pad_token": PAD,
                "model_max_length": 1_000_000}
    config = {key: previous.get(key, defaults[key]) for key in TOKENIZER_CONFIG_KEYS}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        if isinstance(config[key], dict):  # an AddedToken serialised by an older transformers
            config[key] = config[key].get("content")
    config |= {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": dummy_prefix,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": added_tokens_decoder,
    }
    if template is not None:
        config["chat_template"] = template
        (directory / "chat_template.jinja").write_text(template)
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    special_map = {key: config[key] for key in ("bos_token", "eos_token", "unk_token", "pad_token") if config[key]}
    (directory / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2))
    return directory


def _complete_model_config(directory: Path) -> None:
    path = directory / "config.json"
    if not path.is_file():
        return
    config = json.loads(path.read_text())
    rope = config.get("rope_parameters") or {}
    if "rope_theta" not in config and rope.get("rope_theta") is not None:
        config["rope_theta"] = rope["rope_theta"]
        path.write_text(json.dumps(config, indent=2))


def _special_ids(tokenizer_dir: Path | None) -> tuple[int, int, int | None]:
    """bos/eos/pad ids: from the tokenizer's genesis metadata when present, else SentencePiece defaults."""
    if tokenizer_dir is not None and (Path(tokenizer_dir) / "genesis_tokenizer.json").is_file():
        info = json.loads((Path(tokenizer_dir) / "genesis_tokenizer.json").read_text())
        return info["bos_id"], info["chat_eos_id"], info.get("pad_id")
    return 1, 2, None


def read_safetensors_dir(hf_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF directory's safetensors shards, by HF name."""
    from safetensors.torch import load_file

    shards = sorted(Path(hf_dir).glob("*.safetensors"))
    if not shards:
        raise CheckpointError(f"{hf_dir}: no *.safetensors weights; re-save the model with safe_serialization")
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        state |= load_file(str(shard))
    return state


def import_hf(hf_dir: str | Path, dtype: torch.dtype = torch.float32) -> Transformer:
    """Read a Llama-architecture HF directory into the native model."""
    from transformers import AutoConfig

    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise CheckpointError(f"{hf_dir}: no config.json; pass a Hugging Face model directory")
    config = model_config_from_hf(AutoConfig.from_pretrained(hf_dir), str(hf_dir))
    hf_state = read_safetensors_dir(hf_dir)
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
