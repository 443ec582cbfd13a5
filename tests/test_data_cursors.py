"""A trunk grows in cycles on new mixtures (#25.2): each source keeps its own cursor, so a new cycle reads the
documents a source has not read yet before it repeats any; the repetition each source has seen is reported; and
re-preparing data with new weights keeps the trunk's tokenizer, so the resume is accepted.

Documents here are identifiable: every token of document i of a source is `base + i`, so the set of documents a
batch touched is the set of its token values (EOS aside)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from genesis.manifest import Manifest, SourceEntry, TokenizerEntry, read_manifest, sha256_file, write_manifest, write_shard
from genesis_model.loader import TokenLoader
from tests.conftest import read_jsonl, run_trainer

EOS = 2
DOCS_PER_SHARD = 60
BASES = {"web": 100, "code": 1000, "math": 2000}


def make_identified_data(data_dir: Path, weights: dict[str, float], shards: dict[str, int] | None = None) -> Path:
    """Sources of documents whose every token names them (`base + index`); a shard's bytes depend only on its
    source and its index, so data made again with other weights holds the very same shards (same sha256)."""
    tokenizer = data_dir / "tokenizer" / "tokenizer.model"
    tokenizer.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.write_bytes(b"synthetic tokenizer for cursor tests")
    sources = []
    for name, weight in weights.items():
        entries = []
        for shard_index in range((shards or {}).get(name, 2)):
            rng = np.random.default_rng([BASES[name], shard_index])
            docs = [[BASES[name] + shard_index * DOCS_PER_SHARD + i] * int(rng.integers(8, 40)) + [EOS]
                    for i in range(DOCS_PER_SHARD)]
            entry = write_shard(data_dir / name / f"shard_{shard_index:05d}.arrow", docs, eos_id=EOS)
            entry.path = str(Path(entry.path).relative_to(data_dir))
            entries.append(entry)
        sources.append(SourceEntry(name=name, weight=weight, shards=entries))
    write_manifest(data_dir, Manifest(tokenizer=TokenizerEntry(path="tokenizer/tokenizer.model",
                                                               sha256=sha256_file(tokenizer), vocab_size=4096,
                                                               eos_id=EOS), sources=sources))
    return data_dir


def source_of(token: int) -> str:
    return max((base, name) for name, base in BASES.items() if token >= base)[1]


def doc_lengths(data_dir: Path, holdout: int) -> dict[str, dict[int, int]]:
    """Per source, its training documents (by id) and their lengths (EOS included), as the loader holds out."""
    loader = TokenLoader(data_dir, seq_len=15, micro_batch_size=1, holdout_docs_per_source=holdout)
    out = {}
    for name, stream in zip(loader.source_names, loader.train_streams):
        out[name] = {int(doc[0]) - BASES[name]: len(doc) for doc in stream.documents()}
    return out


def read_by_source(loader: TokenLoader, batches: int) -> dict[str, list[int]]:
    """The tokens `batches` micro-batches gave each source, in reading order (one rank: every window)."""
    out: dict[str, list[int]] = {}
    for _ in range(batches):
        for row in loader.next_windows().tolist():
            name = source_of(max(row))
            out.setdefault(name, []).extend(row)
    return out


def docs_in(tokens: list[int], name: str) -> set[int]:
    return {token - BASES[name] for token in tokens if token != EOS}


def assert_first_pass_is_the_unread_documents(cycle2: dict[str, list[int]], seen: dict[str, set[int]],
                                              lengths: dict[str, dict[int, int]]) -> None:
    """Each source's first tokens in the new mixture are exactly its documents not read before (whole, each once);
    only then does it wrap around, to a pass over all of them."""
    for name, train in lengths.items():
        unread = set(train) - seen.get(name, set())
        unread_tokens = sum(train[doc] for doc in unread)
        tokens = cycle2[name]
        assert len(tokens) >= unread_tokens + sum(train.values()), f"{name}: read too little to see the wrap"
        first = tokens[:unread_tokens]
        assert docs_in(first, name) == unread, f"{name}: the rest of the pass is not the unread documents"
        assert not docs_in(first, name) & seen.get(name, set()), f"{name}: a document of cycle 1 came back early"
        assert first.count(EOS) == len(unread)  # each unread document once, whole
        assert docs_in(tokens[unread_tokens : unread_tokens + sum(train.values())], name) == set(train)


def test_a_new_mixture_continues_each_source_where_it_stopped(tmp_path):
    cycle1_data = make_identified_data(tmp_path / "a", {"web": 0.7, "code": 0.3})
    first = TokenLoader(cycle1_data, seq_len=31, micro_batch_size=4, seed=3)
    cycle1 = read_by_source(first, 10)
    seen = {name: docs_in(tokens, name) for name, tokens in cycle1.items()}
    state = json.loads(json.dumps(first.state_dict()))

    # Other weights, another window and micro-batch: the same documents (same shards), a new mixture.
    cycle2_data = make_identified_data(tmp_path / "b", {"web": 0.2, "code": 0.8})
    assert read_manifest(cycle2_data).fingerprint() != read_manifest(cycle1_data).fingerprint()
    second = TokenLoader(cycle2_data, seq_len=47, micro_batch_size=2, seed=3)
    assert second.continue_from(state) == []
    lengths = doc_lengths(cycle2_data, holdout=32)
    for name, train in lengths.items():  # what each source has read so far, in passes over its data
        assert second.repetition()[name] == pytest.approx(sum(train[d] for d in seen[name]) / sum(train.values()))
        assert 0 < second.repetition()[name] < 1
    cycle2 = read_by_source(second, 400)
    assert_first_pass_is_the_unread_documents(cycle2, seen, lengths)
    repetition = second.repetition_metrics()
    assert set(repetition) == {"repetition/web", "repetition/code"}
    assert all(value > 1 for value in repetition.values())  # both wrapped around

    # Within the new mixture a resume is exact again.
    position = json.loads(json.dumps(second.state_dict()))
    expected = [second.next_windows() for _ in range(5)]
    again = TokenLoader(cycle2_data, seq_len=47, micro_batch_size=2, seed=3)
    again.load_state_dict(position)
    assert all((a == again.next_windows()).all() for a in expected)


def test_more_data_and_a_new_source_continue_by_document_identity(tmp_path):
    first = TokenLoader(make_identified_data(tmp_path / "a", {"web": 0.5, "code": 0.5}), seq_len=31,
                        micro_batch_size=4, seed=0)
    cycle1 = read_by_source(first, 12)
    seen = {name: docs_in(tokens, name) for name, tokens in cycle1.items()}
    # web gains a shard (prepared with the same tokenizer), math joins; the sources are listed in another order.
    grown = make_identified_data(tmp_path / "c", {"math": 0.2, "code": 0.3, "web": 0.5}, shards={"web": 3})
    second = TokenLoader(grown, seq_len=31, micro_batch_size=4, seed=0)
    second.continue_from(first.state_dict())
    assert second.repetition()["math"] == 0
    lengths = doc_lengths(grown, holdout=32)
    assert_first_pass_is_the_unread_documents(read_by_source(second, 300), seen, lengths)
    held_out = set(range(3 * DOCS_PER_SHARD)) - set(lengths["web"])
    assert held_out and not held_out & set(lengths["web"])


def test_a_source_left_out_of_a_cycle_keeps_its_cursor_for_a_later_one(tmp_path):
    both = make_identified_data(tmp_path / "a", {"web": 0.5, "code": 0.5})
    first = TokenLoader(both, seq_len=31, micro_batch_size=4, seed=1)
    seen = {name: docs_in(tokens, name) for name, tokens in read_by_source(first, 8).items()}
    web_only = TokenLoader(make_identified_data(tmp_path / "w", {"web": 1.0}), seq_len=31, micro_batch_size=4, seed=1)
    web_only.continue_from(first.state_dict())
    seen["web"] |= docs_in(read_by_source(web_only, 4)["web"], "web")
    third = TokenLoader(both, seq_len=31, micro_batch_size=4, seed=1)
    third.continue_from(json.loads(json.dumps(web_only.state_dict())))
    assert_first_pass_is_the_unread_documents(read_by_source(third, 150), seen, doc_lengths(both, holdout=32))


@pytest.mark.slow
def test_the_trainer_continues_each_source_on_a_new_mixture_and_reports_repetition(tmp_path):
    """A real trunk: cycle 1 (6 steps) on one mixture, cycle 2 (6 more) resumed with --reset-data on other
    weights. The windows the trainer read are replayed from its checkpoints' loader states: cycle 2 read no
    document of cycle 1, while unread ones remained."""
    cycle1_data = make_identified_data(tmp_path / "a", {"web": 0.7, "code": 0.3})
    cycle2_data = make_identified_data(tmp_path / "b", {"web": 0.3, "code": 0.7})
    run_dir = tmp_path / "trunk"
    common = ["max_steps=12", "checkpoint.save_every=6"]
    result = run_trainer(run_dir, cycle1_data, common, ["--stop-at-step", "6"], nproc=1)
    assert result.returncode == 0, result.stderr[-3000:]
    result = run_trainer(run_dir, cycle2_data, common, ["--resume", "auto", "--reset-data"], nproc=1)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "each source continues where it stopped" in result.stderr

    def loader_state(step: int) -> dict:
        path = run_dir / "checkpoints" / f"step_{step:08d}" / "trainer" / "rank_00000.pt"
        return torch.load(path, weights_only=True)["loader"]

    after1, after2 = loader_state(6), loader_state(12)
    settings = {"seq_len": after1["seq_len"], "micro_batch_size": 2, "seed": after1["seed"],
                "holdout_docs_per_source": 16}  # tiny-cpu's eval.holdout_docs_per_source
    replay1 = TokenLoader(cycle1_data, **settings)
    seen = {name: docs_in(tokens, name) for name, tokens in read_by_source(replay1, after1["window_index"] // 2).items()}
    assert replay1.state_dict() == after1  # the replay read what the trainer read
    replay2 = TokenLoader(cycle2_data, **settings)
    replay2.continue_from(after1)
    cycle2 = read_by_source(replay2, after2["window_index"] // 2)
    assert replay2.state_dict() == after2
    for name, tokens in cycle2.items():
        assert not docs_in(tokens, name) & seen[name], f"{name}: cycle 2 read a document of cycle 1"
        assert after2["sources"][name]["epochs"] < 1  # unread documents remained all along

    rows = [row for row in read_jsonl(run_dir / "metrics.jsonl") if row["step"] > 6]
    assert rows and all({"repetition/web", "repetition/code"} <= set(row) for row in rows)
    assert rows[-1]["repetition/code"] > rows[0]["repetition/code"] > 0
    assert rows[-1]["repetition/code"] == pytest.approx(after2["sources"]["code"]["epochs"], abs=1e-5)
    reset = [row for row in read_jsonl(run_dir / "events.jsonl") if row["event"] == "data_reset"]
    assert reset and set(reset[-1]["repetition"]) == {"web", "code"}


# ---------------------------------------------------------------------------------------------------------------
# The tokenizer of a re-prepared mixture

TOKENIZER_CORPUS = {
    "name": "reuse-test",
    "sources": [{"name": "prose", "kind": "builtin", "subset": "prose", "weight": 0.5, "max_docs": 200},
                {"name": "dialog", "kind": "builtin", "subset": "dialog", "weight": 0.5}],
    "tokenizer": {"vocab_size": 1024, "sample_sentences": 3000},
    "docs_per_shard": 200,
    "workers": 1,
    "executor": "serial",
}


def corpus(**changes):
    from data_prep.sources import CorpusConfig
    from genesis.config import validate

    data = json.loads(json.dumps(TOKENIZER_CORPUS))
    for key, value in changes.items():
        target, *path = key.split(".")
        node = data
        for part in [target, *path][:-1]:
            node = node[part]
        node[[target, *path][-1]] = value
    return validate(CorpusConfig, data, "reuse-test corpus")


@pytest.mark.slow
def test_preparing_a_new_mixture_keeps_the_trunks_tokenizer_and_the_resume_is_accepted(tmp_path):
    from data_prep.pipeline import prepare
    from genesis.config import TrainConfig, load_config
    from genesis.errors import DataError
    from genesis_model.train import check_data, check_resume_compatible
    from tests.conftest import TINY_CPU

    data_dir = tmp_path / "data"
    first = prepare(corpus(), data_dir)
    # The sample a tokenizer would be trained on follows the weights: a retrain would give another tokenizer.
    shifted = corpus(**{"sources": [dict(TOKENIZER_CORPUS["sources"][0], weight=0.9),
                                    dict(TOKENIZER_CORPUS["sources"][1], weight=0.1)]})
    second = prepare(shifted, data_dir)
    assert [s.weight for s in second.sources] == [0.9, 0.1]
    assert second.tokenizer.sha256 == first.tokenizer.sha256
    assert second.fingerprint() != first.fingerprint()

    # A later cycle's data dir names the trunk's (its data dir, or its tokenizer directory).
    later = prepare(shifted.model_copy(update={"tokenizer": shifted.tokenizer.model_copy(
        update={"existing": str(data_dir)})}), tmp_path / "later")
    assert later.tokenizer.sha256 == first.tokenizer.sha256

    # The trunk's checkpoint (made on the first data) resumes on the re-prepared data with --reset-data.
    def run_meta(data: Path) -> dict:
        config = load_config(TrainConfig, TINY_CPU, [f"data_dir={data}", "model.vocab_size=1024"])
        return {"model_fingerprint": config.model.fingerprint(), "meaning": config.meaning(),
                "config": json.loads(config.model_dump_json()), **check_data(config)}

    meta = run_meta(data_dir) | {"step": 100, "tokenizer_sha256": first.tokenizer.sha256,
                                 "data_fingerprint": first.fingerprint()}
    check_resume_compatible(meta, run_meta(data_dir), data_dir, reset_data=True)
    check_resume_compatible(meta, run_meta(tmp_path / "later"), data_dir, reset_data=True)

    # Another vocab is refused in one line that says how to keep the tokenizer or train a new one on purpose.
    with pytest.raises(DataError, match="tokenizer.retrain=true"):
        prepare(corpus(**{"tokenizer.vocab_size": 2048}), data_dir)


def test_a_resume_on_another_tokenizer_says_what_to_do_in_one_line(tmp_path):
    from genesis.errors import CheckpointError
    from genesis_model.train import check_resume_compatible

    meta = {"model_fingerprint": "m", "tokenizer_sha256": "a" * 64, "step": 10,
            "config": {"data_dir": "/runs/trunk/data"}}
    run_meta = {"model_fingerprint": "m", "tokenizer_sha256": "b" * 64, "config": {}}
    with pytest.raises(CheckpointError) as err:
        check_resume_compatible(meta, run_meta, tmp_path, reset_data=True)
    assert "\n" not in str(err.value) and "tokenizer.existing=/runs/trunk/data/tokenizer" in str(err.value)
