"""GGUF for llama.cpp, written from an exported Hugging Face directory with the `gguf` package.

    genesis export-gguf <hf dir> model.gguf --type f16|bf16|q8_0

The file follows llama.cpp's `llama` architecture as its own converter (convert_hf_to_gguf.py, LlamaModel)
writes it:

  * tensors `token_embd`, `blk.N.attn_norm|attn_q|attn_k|attn_v|attn_output|ffn_norm|ffn_gate|ffn_up|ffn_down`,
    `output_norm` and `output` (left out for tied embeddings: llama.cpp then reuses `token_embd`);
  * q and k rows permuted from the rotate-half RoPE layout (HF's and Genesis's: channel i pairs with i + d/2)
    to the adjacent-pair layout llama.cpp's `llama` RoPE rotates (2i with 2i + 1), per head, k with the KV heads;
  * norms in F32, matrices in the chosen type (q8_0 falls back to F16 for a matrix whose rows are not a
    multiple of 32, as llama.cpp's converter does);
  * the SentencePiece vocabulary (`tokenizer.ggml.model` "llama") with its scores, token types (special added
    tokens such as the chat markers are control tokens), bos/eos/unk/pad/eot ids, `add_bos_token` and
    `add_eos_token` false, `add_space_prefix` as the SentencePiece model has it (false for Genesis's), and the
    chat template with the default system prompt the model was tuned with (the `{% generation %}` training
    markers removed: inference engines need not know them).

The file is written under a temporary name and renamed into place when complete.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from genesis.errors import CheckpointError
from genesis_model.hf import read_safetensors_dir

GGUF_TYPES = ("f16", "bf16", "q8_0")
# SentencePiece token types as llama.cpp reads them (gguf.TokenType).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def permute_rope_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """q/k projection rows from rotate-half order to llama.cpp's adjacent-pair order, head by head (llama.cpp's
    LlamaModel.permute): within a head, rows [a0..a(d/2-1), b0..b(d/2-1)] become [a0, b0, a1, b1, ...]."""
    rows = weight.shape[0]
    return (weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:])
            .swapaxes(1, 2)
            .reshape(weight.shape))


def gguf_tensor_name(hf_name: str) -> str | None:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    if hf_name.startswith("model.layers."):
        layer, _, rest = hf_name.removeprefix("model.layers.").partition(".")
        if rest in _LAYER_TENSORS:
            return f"blk.{int(layer)}.{_LAYER_TENSORS[rest]}"
    return None


def strip_generation_markers(template: str) -> str:
    for marker in ("{%- generation %}", "{% generation %}", "{%- endgeneration %}", "{% endgeneration %}"):
        template = template.replace(marker, "")
    return template


def _read_hf_config(hf_dir: Path) -> dict:
    if not (hf_dir / "config.json").is_file():
        raise CheckpointError(f"{hf_dir}: no config.json; pass a Hugging Face model directory "
                              f"(genesis export-hf CHECKPOINT DIR writes one from a checkpoint)")
    config = json.loads((hf_dir / "config.json").read_text())
    if config.get("model_type") != "llama":
        raise CheckpointError(f"{hf_dir}: model_type '{config.get('model_type')}' is not llama; "
                              f"export-gguf writes Llama-architecture models only")
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise CheckpointError(f"{hf_dir}: attention/MLP biases are not supported; Genesis models have no biases")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise CheckpointError(f"{hf_dir}: rope_type '{rope.get('rope_type')}' is not supported; plain RoPE only")
    config["rope_theta"] = float(rope.get("rope_theta", config.get("rope_theta", 10_000.0)))
    config.setdefault("head_dim", config["hidden_size"] // config["num_attention_heads"])
    config.setdefault("num_key_value_heads", config["num_attention_heads"])
    return config


def _first(value):
    return value[0] if isinstance(value, list) else value


def read_vocab(hf_dir: Path, vocab_size: int) -> dict:
    """Tokens, scores and types from `tokenizer.model`, special added tokens (tokenizer_config's
    added_tokens_decoder) as control tokens, and the special ids; padded with unused pieces to `vocab_size`."""
    import sentencepiece as spm

    from genesis_model.hf import sentencepiece_adds_dummy_prefix

    model_path = hf_dir / "tokenizer.model"
    if not model_path.is_file():
        raise CheckpointError(f"{hf_dir}: no tokenizer.model (the SentencePiece model); llama.cpp needs its scores. "
                              f"Re-export the directory with this version of Genesis, or copy the data's "
                              f"tokenizer.model in")
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    n = sp.get_piece_size()
    if n > vocab_size:
        raise CheckpointError(f"{hf_dir}: tokenizer has {n} pieces but the model only {vocab_size} embeddings")
    tokens, scores, types = [], [], []
    for i in range(n):
        tokens.append(sp.id_to_piece(i))
        scores.append(float(sp.get_score(i)))
        if sp.is_unknown(i):
            types.append(UNKNOWN)
        elif sp.is_control(i):
            types.append(CONTROL)
        elif sp.is_unused(i):
            types.append(UNUSED)
        elif sp.is_byte(i):
            types.append(BYTE)
        else:
            types.append(NORMAL)
    tokenizer_config = json.loads((hf_dir / "tokenizer_config.json").read_text()) \
        if (hf_dir / "tokenizer_config.json").is_file() else {}
    for token_id, token in (tokenizer_config.get("added_tokens_decoder") or {}).items():
        token_id = int(token_id)
        if token_id >= n or token["content"] != tokens[token_id]:
            raise CheckpointError(f"{hf_dir}: added token {token['content']!r} (id {token_id}) is not that piece of "
                                  f"tokenizer.model; the tokenizer files disagree")
        if types[token_id] == UNKNOWN:
            continue
        # NOTE: as llama.cpp's converter does: special added tokens are control tokens (matched as one token when
        # special tokens are parsed, never printed), others user-defined; neither is reached by merges.
        types[token_id] = CONTROL if token.get("special") else USER_DEFINED
        scores[token_id] = -1000.0
    for i in range(n, vocab_size):
        tokens.append(f"[PAD{i}]")
        scores.append(-10000.0)
        types.append(UNUSED)
    piece_id = {piece: i for i, piece in enumerate(tokens[:n])}

    def special(name: str, fallback: int | None) -> int | None:
        content = tokenizer_config.get(name)
        if isinstance(content, dict):
            content = content.get("content")
        return piece_id.get(content, fallback) if content else fallback

    model_config = json.loads((hf_dir / "config.json").read_text())
    return {
        "tokens": tokens, "scores": scores, "types": types,
        "bos": special("bos_token", _first(model_config.get("bos_token_id"))),
        "eos": special("eos_token", _first(model_config.get("eos_token_id"))),
        "unk": sp.unk_id() if sp.unk_id() >= 0 else None,
        "pad": special("pad_token", _first(model_config.get("pad_token_id"))),
        "add_space_prefix": sentencepiece_adds_dummy_prefix(model_path),
        "im_end": piece_id.get("<|im_end|>"),
        "chat_template": _chat_template(hf_dir, tokenizer_config),
    }


def _chat_template(hf_dir: Path, tokenizer_config: dict) -> str | None:
    if (hf_dir / "chat_template.jinja").is_file():
        return (hf_dir / "chat_template.jinja").read_text()
    return tokenizer_config.get("chat_template")


def export_gguf(hf_dir: str | Path, out_path: str | Path, out_type: str = "f16", log=None) -> Path:
    """Write the Llama-architecture HF directory `hf_dir` as one GGUF file for llama.cpp."""
    import gguf
    from gguf import GGMLQuantizationType as Q
    from gguf import LlamaFileType

    if out_type not in GGUF_TYPES:
        raise CheckpointError(f"--type {out_type}: choose one of {', '.join(GGUF_TYPES)}")
    hf_dir, out_path = Path(hf_dir), Path(out_path)
    config = _read_hf_config(hf_dir)
    vocab = read_vocab(hf_dir, config["vocab_size"])
    state = read_safetensors_dir(hf_dir)
    n_layers, n_heads, n_kv = config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config["head_dim"]
    if head_dim * n_heads != config["hidden_size"]:
        raise CheckpointError(f"{hf_dir}: head_dim × heads ≠ hidden_size; llama.cpp's llama needs them equal")
    matrix_type = {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[out_type]
    file_type = {"f16": LlamaFileType.MOSTLY_F16, "bf16": LlamaFileType.MOSTLY_BF16,
                 "q8_0": LlamaFileType.MOSTLY_Q8_0}[out_type]

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = out_path.with_name(out_path.name + ".tmp")
    tmp_path.unlink(missing_ok=True)
    writer = gguf.GGUFWriter(str(tmp_path), "llama")
    marker = hf_dir / "genesis.json"
    writer.add_name(hf_dir.resolve().name)
    if marker.is_file():
        writer.add_description(f"Genesis model exported from {hf_dir.resolve()}")
    writer.add_file_type(int(file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    writer.add_vocab_size(config["vocab_size"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(n_kv)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])

    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocab["tokens"])
    writer.add_token_scores(vocab["scores"])
    writer.add_token_types(vocab["types"])
    for add, key in ((writer.add_bos_token_id, "bos"), (writer.add_eos_token_id, "eos"),
                     (writer.add_unk_token_id, "unk"), (writer.add_pad_token_id, "pad"),
                     (writer.add_eot_token_id, "im_end")):
        if vocab[key] is not None:
            add(int(vocab[key]))
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(vocab["add_space_prefix"])
    if vocab["chat_template"]:
        writer.add_chat_template(strip_generation_markers(vocab["chat_template"]))

    fallbacks = []
    for hf_name, tensor in state.items():
        name = gguf_tensor_name(hf_name)
        if name is None:
            raise CheckpointError(f"{hf_dir}: weight {hf_name} has no place in llama.cpp's llama architecture")
        if name == "output.weight" and config.get("tie_word_embeddings") and "model.embed_tokens.weight" in state:
            continue  # tied: llama.cpp reuses token_embd
        tensor = tensor.float()
        if name.endswith("attn_q.weight"):
            tensor = permute_rope_rows(tensor, n_heads)
        elif name.endswith("attn_k.weight"):
            tensor = permute_rope_rows(tensor, n_kv)
        data = tensor.numpy()
        if data.ndim == 1:
            writer.add_tensor(name, np.ascontiguousarray(data, dtype=np.float32))
            continue
        qtype = matrix_type
        if qtype == Q.Q8_0 and data.shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0] != 0:
            qtype = Q.F16
            fallbacks.append(name)
        if qtype == Q.F16:
            writer.add_tensor(name, data.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    if fallbacks and log is not None:
        log(f"note: {len(fallbacks)} matrices with rows not a multiple of 32 written as f16 ({', '.join(fallbacks[:3])}"
            f"{', ...' if len(fallbacks) > 3 else ''})")

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp_path, out_path)
    return out_path
