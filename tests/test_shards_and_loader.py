"""The token-shard contract (one test module for both sides) and the loader that reads it."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest

from genesis.errors import CheckpointError, DataError
from genesis.manifest import ShardReader, read_manifest, verify_data_dir, write_shard
from genesis_model.loader import TokenLoader, unigram_cross_entropy
from tests.conftest import make_token_data


def test_a_shard_is_an_arrow_stream_that_datasets_opens_with_uint16_tokens_ending_in_eos(tmp_path):
    docs = [[5, 6, 7, 2], [9, 2], list(range(3, 300)) + [2]]
    entry = write_shard(tmp_path / "s.arrow", docs, eos_id=2)
    assert (entry.num_docs, entry.num_tokens) == (3, 4 + 2 + 298)
    dataset = datasets.Dataset.from_file(str(tmp_path / "s.arrow"))
    assert dataset.features["tokens"].feature.dtype == "uint16"
    assert [row["tokens"] for row in dataset] == docs
    reader = ShardReader(tmp_path / "s.arrow")
    assert reader.doc(2).tolist() == docs[2] and reader.doc(2).dtype == np.uint16
    assert not list(tmp_path.glob("*.tmp"))


def test_shard_writer_refuses_ids_beyond_uint16_and_documents_without_eos(tmp_path):
    with pytest.raises(DataError, match="does not fit uint16"):
        write_shard(tmp_path / "big.arrow", [[70_000, 2]], eos_id=2)
    with pytest.raises(DataError, match="does not end in EOS"):
        write_shard(tmp_path / "noeos.arrow", [[5, 6]], eos_id=2)
    assert not (tmp_path / "big.arrow").exists() and not (tmp_path / "noeos.arrow").exists()


def test_verify_names_a_corrupted_shard_and_a_missing_one(tmp_path):
    data_dir = make_token_data(tmp_path / "data", docs_per_shard=20)
    manifest = verify_data_dir(data_dir)
    shard = data_dir / manifest.sources[0].shards[0].path
    blob = bytearray(shard.read_bytes())
    blob[-20] ^= 0xFF
    shard.write_bytes(bytes(blob))
    with pytest.raises(DataError, match="checksum mismatch") as err:
        verify_data_dir(data_dir)
    assert str(shard) in str(err.value)
    shard.unlink()
    with pytest.raises(DataError, match="shard missing"):
        verify_data_dir(data_dir)


def test_manifest_for_another_tokenizer_is_refused(tmp_path):
    data_dir = make_token_data(tmp_path / "data", docs_per_shard=20)
    (data_dir / "tokenizer" / "tokenizer.model").write_bytes(b"a different tokenizer")
    with pytest.raises(DataError, match="another tokenizer"):
        verify_data_dir(data_dir)


def test_batches_are_packed_windows_of_next_token_pairs(token_data):
    loader = TokenLoader(token_data, seq_len=32, micro_batch_size=3)
    inputs, targets = loader.next_batch()
    assert inputs.shape == targets.shape == (3, 32)
    assert (inputs[:, 1:] == targets[:, :-1]).all()
    assert int(inputs.max()) < read_manifest(token_data).tokenizer.vocab_size


def test_resume_from_state_dict_yields_exactly_the_next_batches(token_data):
    """Read 40 batches, save, rebuild in a fresh loader, load: the next 8 must be identical."""
    first = TokenLoader(token_data, seq_len=48, micro_batch_size=2, seed=5)
    for _ in range(40):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))  # survives serialisation
    expected = [first.next_batch() for _ in range(8)]
    second = TokenLoader(token_data, seq_len=48, micro_batch_size=2, seed=5)
    second.load_state_dict(state)
    for (a_in, a_out), (b_in, b_out) in zip(expected, (second.next_batch() for _ in range(8))):
        assert (a_in == b_in).all() and (a_out == b_out).all()


def test_the_global_window_order_is_the_same_on_one_rank_and_on_two(token_data):
    single = TokenLoader(token_data, seq_len=16, micro_batch_size=4, world_size=1, rank=0, seed=3)
    ranks = [TokenLoader(token_data, seq_len=16, micro_batch_size=2, world_size=2, rank=r, seed=3) for r in range(2)]
    for _ in range(5):
        one = single.next_batch()[0]
        zero_rows, one_rows = ranks[0].next_batch()[0], ranks[1].next_batch()[0]
        interleaved = [zero_rows[0], one_rows[0], zero_rows[1], one_rows[1]]
        for a, b in zip(one, interleaved):
            assert (a == b).all()
    assert ranks[0].state_dict() == ranks[1].state_dict() | {"world_size": 2} == single.state_dict() | {"world_size": 2}


def test_sources_are_mixed_by_weight(token_data):
    loader = TokenLoader(token_data, seq_len=16, micro_batch_size=1, seed=0)
    for _ in range(2000):
        loader.next_batch()
    web, code = loader.windows_per_source
    assert web / (web + code) == pytest.approx(0.7, abs=0.04)


def test_loader_state_from_other_data_is_refused(token_data, tmp_path):
    state = TokenLoader(token_data, seq_len=16, micro_batch_size=1).state_dict()
    other = make_token_data(tmp_path / "other", docs_per_shard=30, seed=9)
    with pytest.raises(CheckpointError, match="data differs"):
        TokenLoader(other, seq_len=16, micro_batch_size=1).load_state_dict(state)


def test_held_out_documents_never_appear_in_training_batches(token_data):
    loader = TokenLoader(token_data, seq_len=64, micro_batch_size=1, holdout_docs_per_source=8)
    held_out = {tuple(doc.tolist()) for stream in loader.val_streams.values() for doc in stream.documents()}
    trained = {tuple(doc.tolist()) for stream in loader.train_streams for doc in stream.documents()}
    assert held_out and not held_out & trained
    assert set(loader.validation_batches(2)) == {"web", "code"}


def test_unigram_baseline_is_a_sane_cross_entropy(token_data):
    loader = TokenLoader(token_data, seq_len=64, micro_batch_size=1)
    baseline = unigram_cross_entropy(loader)
    assert 0 < baseline <= np.log(4096) + 0.5
