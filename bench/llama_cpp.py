"""The llama.cpp round trip (#26): an exported chat model, written as GGUF by `genesis export-gguf`, run by
llama.cpp itself (llama-cpp-python) beside transformers on the same directory.

Measured, on texts of the offline data kit (/work/shared/data):

  * tokenization: llama.cpp's ids (`tokenize(add_bos=False, special=True)`, as llama.cpp's chat path tokenizes a
    rendered prompt) against the HF tokenizer's, on pretraining texts and on SFT dialogues rendered by the chat
    template (so the chat markers are in them) — the headline count. Beside it: llama.cpp with `special=False`
    against SentencePiece itself (what the trainer encoded) on the pretraining texts;
  * greedy replies: the same chat prompt (template's default system prompt, one user turn), greedy, both sides:
    token for token (llama.cpp's greedy sampler on the HF-rendered prompt ids) and text for text
    (llama-cpp-python's `create_chat_completion`, which renders the GGUF's own chat template, temperature 0);
  * logits: max |llama.cpp − HF| over every position of chat dialogues, llama.cpp on the f16 GGUF against HF in
    fp32 (the headline, with its tolerance), against HF with its matrices rounded to f16 (what the file holds),
    and the q8_0 GGUF against HF fp32.

llama-cpp-python is built from its source package into bench/.llama-cpp/site, diskcache into
bench/.llama-cpp/deps (both ignored by git; see BENCHMARKS.md, "llama.cpp round trip", for the commands). The model: `--hf-dir` (an SFT/DPO directory, e.g.
a branch's dpo/), else the newest runs/demo/trunk/branches/*/dpo, else a tiny random-weight export built the way
tests/test_export_formats.py builds its fixtures.

    python bench/llama_cpp.py --hf-dir /tmp/llama-cpp-demo/branch-200/dpo

Results are appended to bench/results/llama_cpp.json (`runs`); the top-level keys hold the latest figures.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LLAMA_CPP_SITE = Path(os.environ.get("GENESIS_LLAMA_CPP_SITE", REPO / "bench" / ".llama-cpp" / "site"))
# this file is bench/llama_cpp.py: its own directory on the path would shadow the llama_cpp package
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(REPO))
# after the venv: only llama_cpp itself (and diskcache, its one pure-Python dependency missing from .venv) come
# from there
sys.path += [str(LLAMA_CPP_SITE), str(REPO / "bench" / ".llama-cpp" / "deps")]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import RESULTS_DIR, append_run, environment, git_dirty, git_rev, host_contention  # noqa: E402

DATA = Path(os.environ.get("GENESIS_SHARED_DATA", REPO.parent / "shared" / "data"))
# Stated before measuring: llama.cpp on the f16 GGUF computes with f16 weights, an f16 KV cache and (on CPU)
# activations rounded to f16 before each f16 matmul, so it cannot match fp32 exactly. For logits of order 10,
# f16's relative precision (2^-11 ≈ 5e-4) over a few layers gives a few 1e-2 at most; 0.05 is the bound claimed.
F16_TOLERANCE = 0.05
Q8_TOLERANCE = 0.5  # 8-bit weights: a looser bound, reported beside the headline, not part of it


def find_hf_dir(arg: Path | None, workdir: Path) -> tuple[Path, str]:
    if arg is not None:
        return arg, "given (--hf-dir)"
    demo = sorted((REPO / "runs" / "demo" / "trunk" / "branches").glob("*/dpo"))
    if demo:
        return demo[-1], "the local genesis demo's newest DPO branch"
    return tiny_export(workdir), "tiny random-weight export (as tests/test_export_formats.py builds it)"


def tiny_export(workdir: Path) -> Path:
    """The test fixtures' DPO directory: the tiny corpus's 2,048-piece tokenizer, a random-weight model, SFT and
    DPO written by the branch stages' own writer (no training)."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    from branch.training import _finish, _tokenizer
    from genesis.config import ModelConfig
    from genesis_model.hf import export_hf
    from genesis_model.model import Transformer
    from tests.conftest import prepare_tiny_corpus

    data = prepare_tiny_corpus(workdir / "data")
    config = ModelConfig(vocab_size=2048, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128,
                         max_seq_len=256, rope_theta=500_000.0, tie_embeddings=False)
    model = Transformer(config)
    model.init_weights(seed=5)
    dirs = {"base": export_hf(model, workdir / "base", tokenizer_dir=data / "tokenizer", dtype=torch.float32)}
    for stage, parent in (("sft", "base"), ("dpo", "sft")):
        hf = AutoModelForCausalLM.from_pretrained(dirs[parent], dtype=torch.float32)
        trainer = SimpleNamespace(model=hf, state=SimpleNamespace(log_history=[{"loss": 1.0}], global_step=1),
                                  save_model=lambda path, hf=hf: hf.save_pretrained(path))
        dirs[stage] = _finish(trainer, _tokenizer(dirs[parent]), workdir / f"{stage}.tmp", workdir / stage, stage,
                              dirs[parent], 1, "You are Genesis, a curious assistant.")
    return dirs["dpo"]


def read_jsonl(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def spread(rows: list, k: int) -> list:
    """k rows evenly spaced through the file (deterministic)."""
    return [rows[i * len(rows) // k] for i in range(min(k, len(rows)))]


def kit_texts(tokenizer, per_file: int) -> tuple[list[dict], list[dict]]:
    """Pretraining texts as they are, and SFT and function-calling dialogues rendered by the directory's chat
    template (the default system prompt included, as a chat would render them; tools listed in the system turn,
    calls and results between their markers)."""
    pretrain = [{"file": f"pretrain/{p.name}", "id": row.get("id"), "text": row["text"]}
                for p in sorted((DATA / "pretrain").glob("*.jsonl.gz")) for row in spread(read_jsonl(p), per_file)]
    chats = []
    for kind in ("sft", "function_calling"):
        for p in sorted((DATA / kind).glob("*.jsonl.gz")):
            for i, row in enumerate(spread(read_jsonl(p), per_file)):
                text = tokenizer.apply_chat_template(row["messages"], tools=row.get("tools") or None, tokenize=False)
                chats.append({"file": f"{kind}/{p.name}", "id": i, "text": text, "messages": row["messages"]})
    return pretrain, chats


def first_difference(a: list[int], b: list[int]) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def compare_tokenization(vocab_llm, tokenizer, sp, pretrain: list[dict], chats: list[dict]) -> dict:
    mismatches, identical, chat_identical, tokens = [], 0, 0, 0
    for item in [*pretrain, *chats]:
        ours = vocab_llm.tokenize(item["text"].encode("utf-8"), add_bos=False, special=True)
        hf = tokenizer(item["text"], add_special_tokens=False)["input_ids"]
        tokens += len(hf)
        if ours == hf:
            identical += 1
            chat_identical += "messages" in item
        else:
            at = first_difference(ours, hf)
            mismatches.append({"file": item["file"], "id": item["id"], "hf_tokens": len(hf),
                               "llama_cpp_tokens": len(ours), "first_difference": at,
                               "hf": tokenizer.convert_ids_to_tokens(hf[max(0, at - 3):at + 5]),
                               "llama_cpp": tokenizer.convert_ids_to_tokens(ours[max(0, at - 3):at + 5])})
    plain_identical = sum(vocab_llm.tokenize(item["text"].encode("utf-8"), add_bos=False, special=False)
                          == sp.encode(item["text"]) for item in pretrain)
    return {
        "texts": len(pretrain) + len(chats),
        "tokenization_identical": identical,
        "tokenization": {
            "setting": "llama.cpp tokenize(add_bos=False, special=True) vs HF tokenizer(add_special_tokens=False)",
            "pretraining_texts": len(pretrain), "chat_texts": len(chats), "tokens_compared": tokens,
            "pretraining_identical": identical - chat_identical, "chat_identical": chat_identical,
            "plain_special_false_vs_sentencepiece": {"texts": len(pretrain), "identical": plain_identical},
            "mismatches": mismatches[:10],
        },
    }


def hf_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()


def llama_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)], dtype=np.float64)


def compare_logits(llm, hf_models: dict, sequences: list[list[int]]) -> dict:
    out = {name: {"max_abs_diff": 0.0, "argmax_agree": 0} for name in hf_models}
    positions, scale = 0, 0.0
    for ids in sequences:
        ours = llama_logits(llm, ids)
        positions += len(ids)
        for name, model in hf_models.items():
            theirs = hf_logits(model, ids)
            out[name]["max_abs_diff"] = max(out[name]["max_abs_diff"], float(np.abs(ours - theirs).max()))
            out[name]["argmax_agree"] += int((ours.argmax(-1) == theirs.argmax(-1)).sum())
            if name == "hf_fp32":
                scale = max(scale, float(np.abs(theirs).max()))
    for row in out.values():
        row["argmax_agree"] = f"{row['argmax_agree']}/{positions}"
        row["max_abs_diff"] = round(row["max_abs_diff"], 6)
    return {"sequences": len(sequences), "positions": positions, "max_abs_hf_logit": round(scale, 3), **out}


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The prompt HF renders for a chat (template, default system prompt, generation prompt), as ids."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def hf_greedy(model, tokenizer, ids: list[int], new_tokens: int, stop: set[int]) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=new_tokens, do_sample=False, eos_token_id=sorted(stop),
                             pad_token_id=tokenizer.pad_token_id, repetition_penalty=1.0, temperature=None,
                             top_p=None, top_k=None)
    return out[0, len(ids):].tolist()


def piece_bytes(sp, ids: list[int]) -> bytes:
    """The bytes SentencePiece's pieces stand for (▁ a space, <0xXX> its byte, control tokens nothing)."""
    out = b""
    for i in ids:
        piece = sp.id_to_piece(i)
        if sp.is_byte(i):
            out += bytes([int(piece[1:-1], 16)])
        elif not (sp.is_control(i) or sp.is_unknown(i)):
            out += piece.replace("\u2581", " ").encode("utf-8")
    return out


def greedy_pairs(llm, hf, hf_f16, tokenizer, sp, prompts: list[list[dict]], new_tokens: int, stop: set[int]) -> list[dict]:
    rows = []
    for messages in prompts:
        ids = chat_ids(tokenizer, messages)
        hf_reply = hf_greedy(hf, tokenizer, ids, new_tokens, stop)
        hf_f16_reply = hf_greedy(hf_f16, tokenizer, ids, new_tokens, stop)
        llm.reset()
        ours = []
        for token in llm.generate(ids, temp=0.0, repeat_penalty=1.0, reset=True):
            ours.append(int(token))
            if token in stop or len(ours) >= new_tokens:
                break
        llm.reset()
        chat = llm.create_chat_completion(messages=messages, temperature=0.0, max_tokens=new_tokens,
                                          repeat_penalty=1.0, seed=0)
        chat_text = chat["choices"][0]["message"]["content"]
        hf_text = tokenizer.decode([t for t in hf_reply if t not in stop], skip_special_tokens=True)
        # llama-cpp-python returns the reply's bytes decoded with errors="ignore" (an incomplete or invalid UTF-8
        # run of byte tokens is dropped; HF's decoder writes U+FFFD per byte instead): the HF ids' own bytes,
        # decoded the same way, are what its text must equal
        hf_bytes_text = piece_bytes(sp, [t for t in hf_reply if t not in stop]).decode("utf-8", errors="ignore")
        rows.append({"prompt_tokens": len(ids), "hf_tokens": len(hf_reply), "ids_identical": ours == hf_reply,
                     "first_difference": None if ours == hf_reply else first_difference(ours, hf_reply),
                     "ids_identical_to_hf_f16_weights": ours == hf_f16_reply,
                     "hf_f16_weights_identical_to_hf_fp32": hf_f16_reply == hf_reply,
                     "chat_text_identical": chat_text == hf_bytes_text,
                     "hf_decode_identical": chat_text == hf_text, "hf_reply": hf_text,
                     "llama_cpp_chat_completion_tokens": chat["usage"]["completion_tokens"],
                     **({} if chat_text == hf_bytes_text else {"llama_cpp_chat_reply": chat_text})})
    return rows


def llama_cpp_version() -> str:
    """llama-cpp-python's version and the llama.cpp it vendors (ggml's version and the commit ggml was built from,
    as the library reports them)."""
    import ctypes

    import llama_cpp

    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    info = []
    for name in ("ggml_version", "ggml_commit"):
        fn = getattr(lib, name, None)
        if fn is not None:
            fn.restype = ctypes.c_char_p
            info.append(f"{name.removeprefix('ggml_')} {fn().decode()}")
    return f"llama-cpp-python {llama_cpp.__version__}" + (f" (ggml {', '.join(info)})" if info else "")


def builtin_template(llm, tokenizer, prompts: list[list[dict]]) -> dict:
    """llama.cpp's own template path without Jinja (`llama_chat_apply_template`, what llama-cli/llama-server use
    without --jinja): it recognises ChatML from the GGUF's template but renders its built-in copy, which knows no
    default system prompt. Recorded to show why --jinja is needed, not part of the headline."""
    import ctypes

    import llama_cpp

    template = llm.metadata["tokenizer.chat_template"].encode()
    identical, example = 0, None
    for messages in prompts:
        chat = (llama_cpp.llama_chat_message * len(messages))(
            *[llama_cpp.llama_chat_message(m["role"].encode(), m["content"].encode()) for m in messages])
        buf = ctypes.create_string_buffer(1 << 16)
        n = llama_cpp.llama_chat_apply_template(template, chat, len(messages), True, buf, len(buf))
        ours = buf.raw[:n].decode("utf-8") if n >= 0 else f"<error {n}>"
        hf = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        identical += ours == hf
        if ours != hf and example is None:
            example = {"llama_cpp": ours[:300], "hf": hf[:300]}
    return {"prompts": len(prompts), "identical": identical, "first_difference": example}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hf-dir", type=Path, default=None, help="an exported chat model directory (SFT/DPO)")
    parser.add_argument("--per-file", type=int, default=16, help="texts taken from each data-kit file")
    parser.add_argument("--prompts", type=int, default=16, help="greedy chat prompts")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--logit-texts", type=int, default=16, help="chat dialogues whose logits are compared")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "llama_cpp.json")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (GGUF files, tiny export)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import llama_cpp
    import sentencepiece as spm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from genesis.chat import EOS, IM_END
    from genesis_model.gguf_export import export_gguf

    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="genesis-llama-cpp-"))
    hf_dir, origin = find_hf_dir(args.hf_dir, work)
    print(f"model: {hf_dir} ({origin})", flush=True)
    ggufs = {kind: export_gguf(hf_dir, work / f"model-{kind}.gguf", kind) for kind in ("f16", "q8_0")}

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    sp = spm.SentencePieceProcessor(model_file=str(hf_dir / "tokenizer.model"))
    config = json.loads((hf_dir / "config.json").read_text())
    n_ctx = int(config["max_position_embeddings"])
    pretrain, chats = kit_texts(tokenizer, args.per_file)

    vocab_llm = llama_cpp.Llama(model_path=str(ggufs["f16"]), vocab_only=True, verbose=False)
    tok = compare_tokenization(vocab_llm, tokenizer, sp, pretrain, chats)
    print(f"tokenization identical: {tok['tokenization_identical']}/{tok['texts']}", flush=True)

    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    hf_f16 = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in hf_f16.parameters():
            if p.ndim == 2:
                p.copy_(p.half().float())  # the GGUF holds matrices in f16, norms in f32
    sequences = [tokenizer(c["text"], add_special_tokens=False)["input_ids"][:n_ctx]
                 for c in spread(chats, args.logit_texts)]
    llm_kwargs = dict(n_ctx=n_ctx, n_batch=n_ctx, n_threads=args.threads, logits_all=True, verbose=False, seed=0)
    llm = llama_cpp.Llama(model_path=str(ggufs["f16"]), **llm_kwargs)
    logits_f16 = compare_logits(llm, {"hf_fp32": hf, "hf_f16_weights": hf_f16}, sequences)
    print(f"f16 logits: {logits_f16}", flush=True)

    stop = {tokenizer.convert_tokens_to_ids(IM_END), tokenizer.convert_tokens_to_ids(EOS)}
    users = [[m for m in c["messages"] if m["role"] == "user"][:1] for c in chats]
    prompts = [u for u in users if u and len(chat_ids(tokenizer, u)) <= n_ctx - args.new_tokens]
    prompts = spread(prompts, args.prompts)
    greedy = greedy_pairs(llm, hf, hf_f16, tokenizer, sp, prompts, args.new_tokens, stop)
    no_jinja = builtin_template(llm, tokenizer, prompts)
    del llm
    print(f"greedy: {[(g['ids_identical'], g['chat_text_identical']) for g in greedy]}", flush=True)

    llm_q8 = llama_cpp.Llama(model_path=str(ggufs["q8_0"]), **llm_kwargs)
    logits_q8 = compare_logits(llm_q8, {"hf_fp32": hf}, sequences)
    del llm_q8
    print(f"q8_0 logits: {logits_q8}", flush=True)

    max_diff = logits_f16["hf_fp32"]["max_abs_diff"]
    greedy_identical = all(g["ids_identical"] and g["chat_text_identical"] for g in greedy)
    latest = {
        "texts": tok["texts"],
        "tokenization_identical": tok["tokenization_identical"],
        "greedy_identical": greedy_identical,
        "max_logit_diff": max_diff,
        "logit_tolerance": F16_TOLERANCE,
        "logits_within_tolerance": max_diff <= F16_TOLERANCE,
        "llama_cpp_version": llama_cpp_version(),
        "command": " ".join(["python", *sys.argv]),
        "git_rev": git_rev(),
    }
    run = {
        **latest,
        "model_dir": str(hf_dir), "model_origin": origin,
        "model": {k: config[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                         "num_key_value_heads", "max_position_embeddings", "tie_word_embeddings")},
        "tokenization": tok["tokenization"],
        "greedy": {"prompts": len(greedy), "new_tokens": args.new_tokens,
                   "ids_identical": sum(g["ids_identical"] for g in greedy),
                   "ids_identical_to_hf_f16_weights": sum(g["ids_identical_to_hf_f16_weights"] for g in greedy),
                   "chat_text_identical": sum(g["chat_text_identical"] for g in greedy),
                   "chat_text_identical_to_hf_decode": sum(g["hf_decode_identical"] for g in greedy),
                   "setting": "HF generate(do_sample=False) fp32 vs llama.cpp greedy sampler on the f16 GGUF "
                              "(same prompt ids) and create_chat_completion(temperature=0) (GGUF's template), its text against "
                              "the HF reply's bytes decoded as llama-cpp-python decodes (invalid UTF-8 dropped)",
                   "replies": greedy},
        "builtin_template_without_jinja": no_jinja,
        "logits": {"tolerance": {"f16_vs_hf_fp32": F16_TOLERANCE, "q8_0_vs_hf_fp32": Q8_TOLERANCE},
                   "f16_gguf": logits_f16, "q8_0_gguf": logits_q8,
                   "q8_0_within_tolerance": logits_q8["hf_fp32"]["max_abs_diff"] <= Q8_TOLERANCE},
        "llama_cpp_system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
        "seconds": round(time.perf_counter() - started, 1),
        **environment(),
        "host": platform.node(),
        **host_contention(),
        "dirty": git_dirty(("bench/llama_cpp.py", "genesis_model/gguf_export.py")),
    }
    append_run(args.out, run, latest)
    print(json.dumps(latest, indent=2))
    if args.keep:
        print(f"GGUF files (and any tiny export) kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
