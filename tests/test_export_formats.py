"""Exported models travel: every directory Genesis writes (export-hf / a branch's base, SFT, DPO) is complete for
transformers and llama.cpp's converter, and `genesis export-gguf` writes a GGUF file that follows llama.cpp's
llama conventions, read back here with gguf's own reader and run by a small reference forward pass."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from data_prep.tokenizer import encode_documents
from genesis.chat import BOS, CHAT_TOKENS, EOS, IM_END, IM_START, MARKER_SENTINELS, UNK
from genesis.config import ModelConfig
from genesis.run_dir import STAGE_MARKER
from genesis_model.hf import export_hf
from genesis_model.model import Transformer

REPO = Path(__file__).resolve().parents[1]
SYSTEM = "You are Genesis, a curious assistant.\nAsk 'why' when it helps."
CHAT_TEXT = "<|im_start|>user\nhi<|im_end|>"
THETA = 500_000.0


def tiny_config(tied: bool) -> ModelConfig:
    # Rows are multiples of 32 (q8_0 blocks); GQA 2:1 so k is permuted with the KV heads.
    return ModelConfig(vocab_size=2048, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=64,
                       rope_theta=THETA, tie_embeddings=tied)


@pytest.fixture(scope="module")
def tokenizer_dir(tiny_corpus) -> Path:
    return tiny_corpus / "tokenizer"


@pytest.fixture(scope="module")
def exports(tokenizer_dir, tmp_path_factory) -> dict[str, Path]:
    """A base export of an untied model, and SFT and DPO directories written by the branch stages' own writer
    (`branch.training._finish`, with a stand-in for TRL's trainer that saves the model as TRL would)."""
    from transformers import AutoModelForCausalLM

    from branch.training import _finish, _tokenizer

    root = tmp_path_factory.mktemp("exports")
    model = Transformer(tiny_config(tied=False))
    model.init_weights(seed=5)
    dirs = {"base": export_hf(model, root / "base", tokenizer_dir=tokenizer_dir, dtype=torch.float32)}
    for stage, parent in (("sft", "base"), ("dpo", "sft")):
        hf = AutoModelForCausalLM.from_pretrained(dirs[parent], dtype=torch.float32)
        trainer = SimpleNamespace(model=hf, state=SimpleNamespace(log_history=[{"loss": 1.0}], global_step=1),
                                  save_model=lambda path, hf=hf: hf.save_pretrained(path))
        dirs[stage] = _finish(trainer, _tokenizer(dirs[parent]), root / f"{stage}.tmp", root / stage, stage,
                              dirs[parent], 1, SYSTEM)
    return dirs


def sp_processor(tokenizer_dir: Path):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))


@pytest.mark.parametrize("stage", ["base", "sft", "dpo"])
def test_every_exported_directory_is_complete_for_transformers(exports, tokenizer_dir, stage):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = exports[stage]
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                 "config.json", "model.safetensors"):
        assert (out / name).is_file(), name
    assert (out / "tokenizer.model").read_bytes() == (tokenizer_dir / "tokenizer.model").read_bytes()
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["add_bos_token"] is False and config["add_eos_token"] is False
    assert config["add_prefix_space"] is False
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"  # a class transformers 4.x knows
    specials = {entry["content"]: entry["special"] for entry in config["added_tokens_decoder"].values()}
    assert all(specials.get(token) is True for token in [*CHAT_TOKENS, BOS, EOS, UNK])
    # transformers 4.x reads only the top-level θ (and would silently use 10,000 without it)
    assert json.loads((out / "config.json").read_text())["rope_theta"] == THETA

    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer(CHAT_TEXT)["input_ids"]
    im_start, im_end = tokenizer.convert_tokens_to_ids(IM_START), tokenizer.convert_tokens_to_ids(IM_END)
    assert ids[0] == im_start and ids[-1] == im_end and ids.count(im_start) == ids.count(im_end) == 1
    assert tokenizer.convert_tokens_to_ids(BOS) not in ids  # no BOS added
    # what the model was trained on: the template's markers as their ids, the text between them as text
    pretraining_text = CHAT_TEXT.replace(IM_START, MARKER_SENTINELS[IM_START]).replace(IM_END, MARKER_SENTINELS[IM_END])
    assert ids == encode_documents(sp_processor(tokenizer_dir), [pretraining_text])[0]

    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                             add_generation_prompt=True)
    turn = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    if stage == "base":
        assert rendered == turn  # nothing was tuned in: no default system prompt
    else:
        assert rendered == f"<|im_start|>system\n{SYSTEM}<|im_end|>\n" + turn
        assert (out / "chat_template.jinja").read_text() == config["chat_template"]
        own = tokenizer.apply_chat_template([{"role": "system", "content": "Be brief."},
                                             {"role": "user", "content": "hi"}], tokenize=False)
        assert own == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
        none = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                             default_system_prompt="")
        assert none == "<|im_start|>user\nhi<|im_end|>\n"
        assert json.loads((out / STAGE_MARKER).read_text())["system_prompt"] == SYSTEM  # what Genesis itself uses

    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.rope_parameters["rope_theta"] == THETA


def gguf_field(reader, key):
    field = reader.fields[key]
    return field.contents()


@pytest.fixture(scope="module")
def dpo_gguf(exports, tmp_path_factory) -> Path:
    from genesis_model.gguf_export import export_gguf

    return export_gguf(exports["dpo"], tmp_path_factory.mktemp("gguf") / "dpo-f16.gguf", "f16")


def test_gguf_metadata_and_tensors_match_the_model(exports, tokenizer_dir, dpo_gguf):
    import gguf
    from safetensors.torch import load_file

    reader = gguf.GGUFReader(dpo_gguf)
    sp = sp_processor(tokenizer_dir)
    vocab = sp.get_piece_size()
    assert gguf_field(reader, "general.architecture") == "llama"
    assert gguf_field(reader, "tokenizer.ggml.model") == "llama"
    tokens = gguf_field(reader, "tokenizer.ggml.tokens")
    scores = gguf_field(reader, "tokenizer.ggml.scores")
    types = gguf_field(reader, "tokenizer.ggml.token_type")
    assert len(tokens) == len(scores) == len(types) == vocab == 2048
    assert tokens == [sp.id_to_piece(i) for i in range(vocab)]
    normal = [i for i in range(vocab) if types[i] == 1]
    assert len(normal) > vocab // 2
    assert all(scores[i] == pytest.approx(sp.get_score(i)) for i in normal)
    for token in [*CHAT_TOKENS, BOS, EOS]:
        assert types[sp.piece_to_id(token)] == 3, token  # control: one token, never printed
    assert types[sp.piece_to_id(UNK)] == 2
    assert types[sp.piece_to_id("<0x0A>")] == 6
    assert gguf_field(reader, "tokenizer.ggml.bos_token_id") == sp.piece_to_id(BOS)
    assert gguf_field(reader, "tokenizer.ggml.eos_token_id") == sp.piece_to_id(IM_END)
    assert gguf_field(reader, "tokenizer.ggml.eot_token_id") == sp.piece_to_id(IM_END)
    assert gguf_field(reader, "tokenizer.ggml.add_bos_token") is False
    assert gguf_field(reader, "tokenizer.ggml.add_space_prefix") is False
    # plain Jinja renders it (the {% generation %} training markers are a transformers extension, left out)
    import jinja2.sandbox

    template = jinja2.sandbox.ImmutableSandboxedEnvironment().from_string(
        gguf_field(reader, "tokenizer.chat_template"))
    rendered = template.render(messages=[{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert rendered == f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"

    config = tiny_config(tied=False)
    assert gguf_field(reader, "llama.rope.freq_base") == THETA
    assert gguf_field(reader, "llama.block_count") == config.n_layers
    assert gguf_field(reader, "llama.context_length") == config.max_seq_len
    assert gguf_field(reader, "llama.embedding_length") == config.dim
    assert gguf_field(reader, "llama.feed_forward_length") == config.ffn_dim
    assert gguf_field(reader, "llama.attention.head_count") == config.n_heads
    assert gguf_field(reader, "llama.attention.head_count_kv") == config.n_kv_heads
    assert gguf_field(reader, "llama.rope.dimension_count") == config.head_dim

    hf_state = load_file(str(exports["dpo"] / "model.safetensors"))
    shapes = {t.name: tuple(int(n) for n in reversed(t.shape)) for t in reader.tensors}
    assert len(shapes) == len(hf_state) == 3 + 9 * config.n_layers
    assert shapes["token_embd.weight"] == tuple(hf_state["model.embed_tokens.weight"].shape)
    assert shapes["output.weight"] == tuple(hf_state["lm_head.weight"].shape)
    for i in range(config.n_layers):
        assert shapes[f"blk.{i}.attn_q.weight"] == (config.dim, config.dim)
        assert shapes[f"blk.{i}.attn_k.weight"] == (config.n_kv_heads * config.head_dim, config.dim)
        assert shapes[f"blk.{i}.ffn_down.weight"] == (config.dim, config.ffn_dim)
        assert shapes[f"blk.{i}.ffn_norm.weight"] == (config.dim,)
    types_of = {t.name: t.tensor_type for t in reader.tensors}
    assert types_of["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.F16
    assert types_of["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32


def gguf_weights(path: Path) -> tuple[dict[str, np.ndarray], object]:
    import gguf

    reader = gguf.GGUFReader(path)
    weights = {}
    for t in reader.tensors:
        shape = tuple(int(n) for n in reversed(t.shape))
        weights[t.name] = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64).reshape(shape)
    return weights, reader


def llama_cpp_style_forward(weights: dict[str, np.ndarray], tokens: list[int], config: ModelConfig) -> np.ndarray:
    """Logits the way llama.cpp's llama graph computes them from the GGUF tensors: RoPE rotates adjacent channel
    pairs (2i, 2i+1) of each head (ggml's normal mode), which is why q and k rows are permuted on export."""
    def rms(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + config.norm_eps) * w

    def rope(x):  # (T, heads, head_dim)
        half = config.head_dim // 2
        freqs = config.rope_theta ** (-np.arange(half) * 2.0 / config.head_dim)
        angle = np.arange(x.shape[0])[:, None, None] * freqs[None, None, :]
        even, odd = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = even * np.cos(angle) - odd * np.sin(angle)
        out[..., 1::2] = even * np.sin(angle) + odd * np.cos(angle)
        return out

    T, hd, group = len(tokens), config.head_dim, config.n_heads // config.n_kv_heads
    x = weights["token_embd.weight"][tokens]
    mask = np.triu(np.full((T, T), -np.inf), 1)
    for i in range(config.n_layers):
        w = lambda name: weights[f"blk.{i}.{name}.weight"]  # noqa: E731
        h = rms(x, w("attn_norm"))
        q = rope((h @ w("attn_q").T).reshape(T, config.n_heads, hd))
        k = rope((h @ w("attn_k").T).reshape(T, config.n_kv_heads, hd))
        v = (h @ w("attn_v").T).reshape(T, config.n_kv_heads, hd)
        k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
        scores = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd) + mask
        att = np.exp(scores - scores.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        x = x + np.einsum("hts,shd->thd", att, v).reshape(T, -1) @ w("attn_output").T
        h = rms(x, w("ffn_norm"))
        gate = h @ w("ffn_gate").T
        x = x + ((gate / (1 + np.exp(-gate))) * (h @ w("ffn_up").T)) @ w("ffn_down").T
    output = weights.get("output.weight", weights["token_embd.weight"])
    return rms(x, weights["output_norm.weight"]) @ output.T


@pytest.mark.parametrize("tied", [False, True])
def test_gguf_f16_computes_what_transformers_computes(tokenizer_dir, tmp_path, tied):
    from transformers import AutoModelForCausalLM

    from genesis_model.gguf_export import export_gguf

    config = tiny_config(tied)
    model = Transformer(config)
    model.init_weights(seed=11)
    hf_dir = export_hf(model, tmp_path / "hf", tokenizer_dir=tokenizer_dir, dtype=torch.float32)
    weights, _ = gguf_weights(export_gguf(hf_dir, tmp_path / "m.gguf", "f16"))
    assert ("output.weight" in weights) is not tied

    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.ndim == 2:
                p.copy_(p.half().float())  # the GGUF holds matrices in f16, norms in f32
        tokens = sp_processor(tokenizer_dir).encode(CHAT_TEXT + "\nThe weather is")
        expected = hf(torch.tensor([tokens])).logits[0].double().numpy()
    actual = llama_cpp_style_forward(weights, tokens, config)
    assert np.abs(actual - expected).max() < 1e-4
    assert (actual.argmax(-1) == expected.argmax(-1)).all()


def genesis(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "2"})


def test_export_gguf_command_writes_q8_0_and_bf16(exports, tmp_path):
    import gguf

    out = tmp_path / "sft-q8.gguf"
    result = genesis("export-gguf", str(exports["sft"]), str(out), "--type", "q8_0")
    assert result.returncode == 0, result.stderr[-2000:]
    assert str(out) in result.stdout
    weights, reader = gguf_weights(out)
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.1.ffn_down.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["token_embd.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["output_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert gguf_field(reader, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    from safetensors.torch import load_file

    embed = load_file(str(exports["sft"] / "model.safetensors"))["model.embed_tokens.weight"].double().numpy()
    scale = np.abs(embed).max(-1, keepdims=True) / 127
    assert (np.abs(weights["token_embd.weight"] - embed) <= scale).all()

    from genesis_model.gguf_export import export_gguf

    bf16 = export_gguf(exports["sft"], tmp_path / "sft-bf16.gguf", "bf16")
    weights, reader = gguf_weights(bf16)
    assert {t.name: t.tensor_type for t in reader.tensors}["blk.0.attn_v.weight"] == gguf.GGMLQuantizationType.BF16
    assert np.allclose(weights["token_embd.weight"], embed, rtol=1e-2, atol=1e-6)


def test_export_gguf_refuses_a_directory_without_the_sentencepiece_model(exports, tmp_path):
    import shutil

    broken = tmp_path / "no-spm"
    shutil.copytree(exports["base"], broken)
    (broken / "tokenizer.model").unlink()
    result = genesis("export-gguf", str(broken), str(tmp_path / "x.gguf"))
    assert result.returncode != 0
    line = result.stderr.strip().splitlines()[-1]
    assert "tokenizer.model" in line and "Traceback" not in result.stderr
    assert not (tmp_path / "x.gguf").exists()


LOWER_BOUND_CHECK = """
import json, sys
import transformers
from transformers import AutoConfig, AutoTokenizer
out, text, system = sys.argv[1], sys.argv[2], sys.argv[3]
tokenizer = AutoTokenizer.from_pretrained(out)
config = AutoConfig.from_pretrained(out)
rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
ids = tokenizer(text)["input_ids"]
try:
    import torch
    from transformers import AutoModelForCausalLM
except ImportError:
    logits = None
else:
    model = AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].tolist()
print(json.dumps({"version": transformers.__version__, "ids": ids, "rope_theta": getattr(config, "rope_theta", None),
                  "rendered": rendered, "logits": logits}))
"""


@pytest.mark.skipif(not os.environ.get("GENESIS_TRANSFORMERS_LOWER_BOUND_PYTHON") and not os.environ.get("CI"),
                    reason="set GENESIS_TRANSFORMERS_LOWER_BOUND_PYTHON to a python with transformers at the bound "
                           "(bash .ci/transformers-lower-bound.sh builds one and prints it; CI always does)")
@pytest.mark.parametrize("stage", ["base", "dpo"])
def test_the_transformers_lower_bound_reads_the_directory_as_written(exports, tokenizer_dir, stage):
    python = os.environ.get("GENESIS_TRANSFORMERS_LOWER_BOUND_PYTHON")
    assert python, "CI runs this test: .ci/run sets GENESIS_TRANSFORMERS_LOWER_BOUND_PYTHON"
    result = subprocess.run([python, "-c", LOWER_BOUND_CHECK, str(exports[stage]), CHAT_TEXT, SYSTEM],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    # the template's markers as their ids and the text between them as text, as transformers 5.x reads it above
    pretraining_text = CHAT_TEXT.replace(IM_START, MARKER_SENTINELS[IM_START]).replace(IM_END, MARKER_SENTINELS[IM_END])
    assert seen["ids"] == encode_documents(sp_processor(tokenizer_dir), [pretraining_text])[0]
    assert seen["rope_theta"] == THETA
    assert (SYSTEM in seen["rendered"]) is (stage != "base")
    if seen["logits"] is not None:  # the model computes what it computes here (a wrong θ would not)
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(exports[stage], dtype=torch.float32).eval()
        with torch.no_grad():
            expected = model(torch.tensor([seen["ids"]])).logits[0]
        assert (torch.tensor(seen["logits"]) - expected).abs().max().item() < 1e-4


@pytest.mark.skipif(not os.environ.get("GENESIS_LLAMA_CPP_CONVERTER") and not os.environ.get("CI"),
                    reason="set GENESIS_LLAMA_CPP_CONVERTER to llama.cpp's convert_hf_to_gguf.py (in the "
                           "llama-cpp-python source package, vendor/llama.cpp/; bash .ci/llama-cpp-converter.sh "
                           "fetches it and prints the path; CI always does)")
def test_llama_cpp_own_converter_reads_the_directory_as_export_gguf_does(exports, dpo_gguf, tmp_path):
    """llama.cpp's converter on a DPO directory: the same tensors, byte for byte (q/k permuted alike), the same
    vocabulary, scores and token types (its converter makes the special <|unk|> a control token; SentencePiece's
    unknown type is kept here), no BOS added, no space prefix."""
    assert os.environ.get("GENESIS_LLAMA_CPP_CONVERTER"), "CI runs this test: .ci/run sets GENESIS_LLAMA_CPP_CONVERTER"
    converter = Path(os.environ["GENESIS_LLAMA_CPP_CONVERTER"])
    theirs = tmp_path / "theirs.gguf"
    result = subprocess.run([sys.executable, str(converter), str(exports["dpo"]), "--outtype", "f16", "--outfile",
                             str(theirs)], capture_output=True, text=True, timeout=600, cwd=converter.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    import gguf

    ours, other = gguf.GGUFReader(dpo_gguf), gguf.GGUFReader(theirs)
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.bos_token_id",
                "tokenizer.ggml.eos_token_id", "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_space_prefix",
                "llama.rope.freq_base", "llama.block_count", "llama.context_length", "llama.attention.head_count_kv"):
        assert gguf_field(ours, key) == gguf_field(other, key), key
    unk = gguf_field(ours, "tokenizer.ggml.unknown_token_id")
    for key in ("tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        a, b = gguf_field(ours, key), gguf_field(other, key)
        assert [x for i, x in enumerate(a) if i != unk] == [x for i, x in enumerate(b) if i != unk], key
    theirs_tensors = {t.name: t for t in other.tensors}
    assert {t.name for t in ours.tensors} == set(theirs_tensors)
    for t in ours.tensors:
        assert t.tensor_type == theirs_tensors[t.name].tensor_type, t.name
        assert np.array_equal(t.data, theirs_tensors[t.name].data), t.name


def test_generate_and_serve_render_the_system_prompt_asked_for_not_the_templates_default(exports):
    """A DPO directory's template defaults to the prompt it was tuned with; `genesis generate --system ''` and the
    serve page's 'no system prompt' must still render none, and an explicit prompt replaces the default."""
    from transformers import AutoTokenizer

    from genesis_model.prompt import prepare_prompt

    tokenizer = AutoTokenizer.from_pretrained(exports["dpo"])
    rendered = lambda system: tokenizer.decode(prepare_prompt(tokenizer, "hi", True, str(exports["dpo"]),  # noqa: E731
                                                              system=system).ids)
    assert "system" not in rendered("") and SYSTEM not in rendered("")
    assert "Be brief." in rendered("Be brief.") and SYSTEM not in rendered("Be brief.")
    assert SYSTEM in rendered(None)  # unset: the prompt the model was tuned with, as before
