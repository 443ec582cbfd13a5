"""Specifications of the data stage, on the real data kit in ../shared/data."""

from __future__ import annotations

import gzip
import json
import os
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_prep.clean import clean_texts
from data_prep.dedup import deduplicate, near_duplicate_clusters
from data_prep.pipeline import prepare
from data_prep.sources import CleanConfig, CorpusConfig, SourceConfig, iter_texts
from genesis.chat import CHAT_TOKENS, MARKER_SENTINELS, render_chat
from data_prep.tokenizer import SentencePieceTokenizer, encode_documents, train_sentencepiece
from genesis.errors import DataError
from genesis.manifest import verify_data_dir
from tests.conftest import SHARED, readable

DATA = SHARED / "data"


def read_jsonl_gz(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def all_kit_texts() -> list[str]:
    texts = []
    for path in sorted((DATA / "pretrain").glob("*.jsonl.gz")):
        texts += [row["text"] for row in read_jsonl_gz(path)]
    for folder in ("sft", "function_calling"):
        for path in sorted((DATA / folder).glob("*.jsonl.gz")):
            texts += [render_chat(row["messages"], row.get("tools")) for row in read_jsonl_gz(path)]
    for path in sorted((DATA / "dpo").glob("*.jsonl.gz")):
        for row in read_jsonl_gz(path):
            texts += [render_chat(row["prompt"] + row["chosen"]), render_chat(row["prompt"] + row["rejected"])]
    return texts


@pytest.fixture(scope="module")
def kit_tokenizer(tmp_path_factory) -> Path:
    """A tokenizer trained on a sample of the whole kit (vocab 8,192 keeps the test quick)."""
    rng = random.Random(0)
    lines = [line for text in all_kit_texts() for line in text.split("\n") if line.strip()]
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_sentencepiece(rng.sample(lines, 100_000), out, vocab_size=8192)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Sources


def local(name, paths, **fields) -> SourceConfig:
    return SourceConfig(name=name, kind="local", paths=[str(p) for p in paths], **({"weight": 1.0} | fields))


def test_local_jsonl_gz_text_chat_and_function_calling_records_are_read_through_datasets():
    text = list(iter_texts(local("web", [DATA / "pretrain" / "c4_web_sample.jsonl.gz"])))
    assert len(text) == 300 and all(isinstance(t, str) and t for t in text)
    chat = [readable(t) for t in iter_texts(local("sft", [DATA / "sft" / "gsm8k.test.jsonl.gz"], format="chat"))]
    assert chat[0].startswith("<|im_start|>user\n") and "<|im_start|>assistant\n" in chat[0]
    calls = list(map(readable, iter_texts(local("fc", [DATA / "function_calling" / "glaive_toolcall_sample.jsonl.gz"],
                                  format="function_calling"))))
    assert any("<tool_call>" in t for t in calls) and any("<tools>" in t for t in calls)


def test_parquet_and_plain_text_files_are_read_too(tmp_path):
    pq.write_table(pa.table({"text": ["first parquet document", "second one"]}), tmp_path / "a.parquet")
    (tmp_path / "b.txt").write_text("line one\nline two\n")
    assert list(iter_texts(local("p", [tmp_path / "a.parquet"]))) == ["first parquet document", "second one"]
    assert list(iter_texts(local("t", [tmp_path / "b.txt"]))) == ["line one", "line two"]


def test_an_invalid_json_line_is_reported_by_file_and_line_or_skipped_and_counted(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "good one"}\n{"text": broken\n{"text": "good two"}\n')
    with pytest.raises(DataError) as err:
        list(iter_texts(local("bad", [path]), on_bad="fail"))
    assert f"{path}:2" in str(err.value)
    counts: dict = {}
    assert list(iter_texts(local("bad", [path]), on_bad="skip", counts=counts)) == ["good one", "good two"]
    assert counts == {"invalid_json": 1}


def test_records_without_the_text_field_are_counted_or_refused(tmp_path):
    path = tmp_path / "fields.jsonl"
    path.write_text('{"text": "kept"}\n{"body": "no text field"}\n')
    counts: dict = {}
    assert list(iter_texts(local("f", [path]), counts=counts)) == ["kept"]
    assert counts == {"malformed_record": 1}
    with pytest.raises(DataError, match="record 2"):
        list(iter_texts(local("f", [path]), on_bad="fail"))


def test_missing_and_non_utf8_files_fail_with_one_line(tmp_path):
    with pytest.raises(DataError, match="no file matches"):
        list(iter_texts(local("m", [tmp_path / "nope.jsonl"])))
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes('{"text": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        list(iter_texts(local("l", [latin])))


def test_rendered_conversations_equal_the_tokenizer_chat_template(kit_tokenizer):
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(kit_tokenizer))
    row = read_jsonl_gz(DATA / "function_calling" / "glaive_toolcall_sample.jsonl.gz")[0]
    assert render_chat(row["messages"], row["tools"]) == tokenizer.apply_chat_template(
        row["messages"], tools=row["tools"], tokenize=False)
    chat = read_jsonl_gz(DATA / "sft" / "gsm8k.test.jsonl.gz")[0]["messages"]
    system_chat = [{"role": "system", "content": "Be curious."}] + chat
    assert render_chat(system_chat) == tokenizer.apply_chat_template(system_chat, tokenize=False)


# ---------------------------------------------------------------------------------------------------------------
# Cleaning and dedup


def test_filters_normalise_and_count_their_reasons():
    counts: Counter = Counter()
    texts = ["e\u0301te is a word that must be long enough to pass", "short", "spam line\n" * 10,
             "ok text with a \x00 control char inside, long enough to keep"]
    kept = clean_texts(texts, CleanConfig(min_chars=20, max_control_char_fraction=0.5), counts)
    assert kept[0].startswith("\u00e9te")  # NFC
    assert "\x00" not in kept[1]
    assert counts == Counter({"docs_in": 4, "removed_too_short": 1, "removed_repeated_lines": 1})


def test_dedup_removes_exact_and_planted_near_duplicates_and_keeps_distinct_documents():
    rng = random.Random(1)
    documents = [row["text"] for row in read_jsonl_gz(DATA / "pretrain" / "wikipedia_sample.jsonl.gz")][:300]
    documents = [d for d in documents if len(d.split()) > 150][:100]
    near = []
    for doc in documents[:30]:
        words = doc.split()
        near.append(" ".join("edited" if rng.random() < 0.02 else w for w in words))
    corpus = documents + ["  " + documents[5].replace(" ", "   ") + "\n"] + near  # differs only in spacing
    keep, report = deduplicate(corpus)
    assert report["exact_duplicates"] == 1
    removed = set(range(len(corpus))) - set(keep)
    planted = set(range(len(documents) + 1, len(corpus)))
    assert len(removed & planted) >= 0.8 * len(planted)  # the 14×8 S-curve finds ~96% at Jaccard 0.82
    assert set(range(len(documents))) <= set(keep)  # no distinct document lost
    assert report["examples"]


def _shingle_sets_with_jaccard(similarity_percent: int) -> list[np.ndarray]:
    """Two sorted shingle-hash sets of 100 elements each sharing `similarity_percent`% of their union."""
    shared = round(200 * similarity_percent / (100 + similarity_percent))  # |A∩B| / (200 − |A∩B|)
    a = np.arange(100, dtype=np.uint64)
    b = np.concatenate([a[:shared], np.arange(1000, 1000 + 100 - shared, dtype=np.uint64)])
    return [a, np.sort(b)]


def test_near_dedup_does_not_link_an_accidental_band_collision_between_dissimilar_documents():
    signatures = np.arange(2 * 112, dtype=np.uint32).reshape(2, 112)
    signatures[1, :8] = signatures[0, :8]  # one shared band bucket
    representative = near_duplicate_clusters(signatures, _shingle_sets_with_jaccard(10), bands=14, rows=8)
    assert list(representative) == [0, 1]


def test_near_dedup_links_a_verified_pair_that_only_an_offset_band_proposes():
    signatures = np.arange(2 * 112, dtype=np.uint32).reshape(2, 112)
    signatures[1, 4:12] = signatures[0, 4:12]  # straddles aligned bands 0 and 1: only the offset band matches
    shingle_sets = _shingle_sets_with_jaccard(80)
    assert list(near_duplicate_clusters(signatures, shingle_sets, 14, 8, offset_bands=False)) == [0, 1]
    assert list(near_duplicate_clusters(signatures, shingle_sets, 14, 8, offset_bands=True)) == [0, 0]


def test_near_dedup_compares_every_pair_in_a_bucket_so_a_dissimilar_middle_member_hides_nothing():
    signatures = np.zeros((3, 112), dtype=np.uint32)  # all three share every bucket
    similar_a, similar_c = _shingle_sets_with_jaccard(90)
    unrelated_b = np.arange(5000, 5100, dtype=np.uint64)
    representative = near_duplicate_clusters(signatures, [similar_a, unrelated_b, similar_c], 14, 8)
    assert list(representative) == [0, 1, 0]


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer


@pytest.mark.slow
def test_tokenizer_round_trips_and_the_hf_tokenizer_gives_sentencepiece_ids_on_every_kit_document(kit_tokenizer):
    from transformers import PreTrainedTokenizerFast

    sp = SentencePieceTokenizer(kit_tokenizer / "tokenizer.model")
    hf = PreTrainedTokenizerFast.from_pretrained(str(kit_tokenizer))
    texts = all_kit_texts()
    assert len(texts) > 30_000
    sp_total = hf_total = 0
    # Text is text on both paths: the chat markers quoted in these rendered strings are characters too
    # (conversations get their markers by id through their segments: tests/test_special_tokens.py). Each side
    # encodes the kit as one batch, on every core.
    threads = os.cpu_count() or 1
    every_sp = sp.sp.encode(texts, num_threads=threads)
    every_hf = hf(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    for text, sp_ids, hf_ids in zip(texts, every_sp, every_hf, strict=True):
        assert sp.decode(sp_ids) == text
        assert hf_ids == sp_ids, text[:200]
        sp_total += len(sp_ids)
        hf_total += len(hf_ids)
    assert sp_total == hf_total > 10_000_000


def test_tokenizer_has_the_contracted_special_ids_and_single_token_chat_markers(kit_tokenizer):
    sp = SentencePieceTokenizer(kit_tokenizer / "tokenizer.model").sp
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, 3)
    for marker in CHAT_TOKENS:  # one control id where the template writes it, never produced from text
        assert sp.is_control(sp.piece_to_id(marker)) and sp.id_to_piece(sp.piece_to_id(marker)) == marker
        assert encode_documents(sp, [MARKER_SENTINELS[marker]]) == [[sp.piece_to_id(marker)]]
    assert sp.encode("1234") == [sp.piece_to_id(d) for d in "1234"]  # digits split
    info = json.loads((kit_tokenizer / "genesis_tokenizer.json").read_text())
    assert info["chat_eos_id"] == sp.piece_to_id("<|im_end|>")
    assert "{% generation %}" in json.loads((kit_tokenizer / "tokenizer_config.json").read_text())["chat_template"].replace("{%- generation %}", "{% generation %}")


def test_a_vocab_too_large_for_uint16_is_refused(tmp_path):
    with pytest.raises(DataError, match="uint16"):
        train_sentencepiece(["some text"], tmp_path / "t", vocab_size=70_000)


# ---------------------------------------------------------------------------------------------------------------
# The whole stage


def small_corpus(**fields) -> CorpusConfig:
    sources = [
        local("web", [DATA / "pretrain" / "c4_web_sample.jsonl.gz"], weight=0.6),
        local("math", [DATA / "pretrain" / "gsm8k.test.jsonl.gz"], weight=0.3, max_docs=400),
        local("chat", [DATA / "sft" / "alpaca_gpt4_sample.jsonl.gz"], format="chat", weight=0.1, max_docs=200),
    ]
    return CorpusConfig(name="small", sources=sources, tokenizer={"vocab_size": 2048, "sample_sentences": 20_000},
                        docs_per_shard=150, **({"executor": "serial"} | fields))


def test_prepare_writes_verified_shards_and_a_rerun_skips_complete_ones_and_redoes_partial_ones(tmp_path):
    manifest = prepare(small_corpus(), tmp_path / "data")
    verify_data_dir(tmp_path / "data")
    assert {s.name for s in manifest.sources} == {"web", "math", "chat"}
    report = json.loads((tmp_path / "data" / "report.json").read_text())
    assert report["web"]["docs_in"] == 300 and "license" in report["web"]
    for name in ("web", "math", "chat"):
        counts = report[name]
        removed = sum(v for k, v in counts.items() if k.startswith("removed_")) + counts["exact_duplicates_removed"] \
            + counts["near_duplicates_removed"]
        assert counts["docs_out"] == counts["docs_in"] - removed
        assert len(counts["duplicate_examples"]) == min(3, counts["exact_duplicates_removed"] + counts["near_duplicates_removed"])

    shards = sorted(tmp_path / "data" / shard.path for source in manifest.sources for shard in source.shards)
    mtimes = {p: p.stat().st_mtime_ns for p in shards}
    victim = shards[0]
    victim.unlink()  # a shard lost mid-write: its sidecar says complete, the file is gone
    again = prepare(small_corpus(), tmp_path / "data")
    assert again == manifest
    assert victim.is_file()
    assert all(p.stat().st_mtime_ns == mtimes[p] for p in shards if p != victim)


@pytest.mark.slow
def test_prepare_on_a_local_dask_cluster_of_two_workers_gives_the_same_manifest_as_one_process(tmp_path):
    one_process = prepare(small_corpus(executor="serial"), tmp_path / "serial")
    by_dask = prepare(small_corpus(workers=2, executor="dask"), tmp_path / "dask")
    assert by_dask == one_process
    assert (tmp_path / "dask" / "dedup" / "removed.parquet").read_bytes() == \
        (tmp_path / "serial" / "dedup" / "removed.parquet").read_bytes()


def test_a_corpus_empty_after_filtering_fails_with_one_line(tmp_path):
    corpus = small_corpus(clean={"min_chars": 10_000_000})
    with pytest.raises(DataError, match="no document survived"):
        prepare(corpus, tmp_path / "data")
    assert not (tmp_path / "data" / "manifest.json").exists()


def test_hub_record_shapes_render_to_chatml(tmp_path):
    """ShareGPT conversations (OpenHermes, Hermes FC), JSON-string conversations (Orca AgentInstruct) and
    xLAM's JSON-string fields, read through the same local-file path the hub path shares."""
    sharegpt = tmp_path / "sharegpt.jsonl"
    sharegpt.write_text(json.dumps({"conversations": [{"from": "system", "value": "Be curious."},
                                                      {"from": "human", "value": "Why is the sky blue?"},
                                                      {"from": "gpt", "value": "Rayleigh scattering."}]}) + "\n")
    text = readable(next(iter_texts(local("s", [sharegpt], format="sharegpt", messages_field="conversations"))))
    assert text == ("<|im_start|>system\nBe curious.<|im_end|>\n<|im_start|>user\nWhy is the sky blue?<|im_end|>\n"
                    "<|im_start|>assistant\nRayleigh scattering.<|im_end|>\n")
    orca = tmp_path / "orca.jsonl"
    orca.write_text(json.dumps({"messages": json.dumps([{"role": "user", "content": "hi"},
                                                        {"role": "assistant", "content": "hello"}])}) + "\n")
    assert "hello<|im_end|>" in readable(next(iter_texts(local("o", [orca], format="chat"))))
    xlam = tmp_path / "xlam.jsonl"
    xlam.write_text(json.dumps({"query": "Weather in Oslo?",
                                "answers": json.dumps([{"name": "weather", "arguments": {"city": "Oslo"}}]),
                                "tools": json.dumps([{"name": "weather", "description": "forecast",
                                                      "parameters": {"city": {"type": "str"}}}])}) + "\n")
    text = readable(next(iter_texts(local("x", [xlam], format="xlam"))))
    assert '<tool_call>{"name": "weather", "arguments": {"city": "Oslo"}}</tool_call>' in text and "<tools>" in text
