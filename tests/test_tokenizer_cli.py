"""`genesis tokenizer train` writes a tokenizer and touches nothing else (issue #24, defect 1); the manifest records
the Hugging Face twin and `genesis data verify` checks it; a vocabulary too large for uint16 shards is refused
when the corpus config is read (defect 6)."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, SHARED

WEB = SHARED / "data" / "pretrain" / "c4_web_sample.jsonl.gz"


def genesis(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli.main", *map(str, args)], capture_output=True, text=True,
                          timeout=600, cwd=REPO)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0, result.stdout[-2000:]
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr[-2000:]
    return lines[0]


def small_corpus(path: Path, vocab_size: int = 400) -> Path:
    path.write_text(f"name: small\nsources:\n  - {{name: web, kind: local, paths: ['{WEB}'], weight: 1.0, "
                    f"max_docs: 150}}\ntokenizer: {{vocab_size: {vocab_size}, sample_sentences: 5000}}\n")
    return path


def tree_digest(directory: Path) -> dict[str, str]:
    return {str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(directory.rglob("*")) if path.is_file()}


def prepared_looking_dir(directory: Path) -> Path:
    """What a prepared data directory holds (manifest, report, a shard, clean text, stage markers)."""
    for name, content in [("manifest.json", '{"version": 1}'), ("report.json", "{}"),
                          ("web/shard_00000.arrow", "shard bytes"), ("clean/web/part_00000.arrow", "clean text"),
                          (".stages/clean.json", '{"key": "abc"}')]:
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_text(content)
    return directory


def test_tokenizer_train_into_a_data_dir_adds_the_tokenizer_and_keeps_everything_else(tmp_path):
    corpus = small_corpus(tmp_path / "corpus.yaml")
    out = prepared_looking_dir(tmp_path / "data")
    before = tree_digest(out)

    result = genesis("tokenizer", "train", "--corpus", corpus, "--out", out)
    assert result.returncode == 0, result.stderr[-2000:]
    after = tree_digest(out)
    assert {name: after.get(name) for name in before} == before
    added = set(after) - set(before)
    assert added == {"tokenizer.model", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                     "genesis_tokenizer.json"}
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"tokenizer": str(out / "tokenizer.model")}
    assert sorted(path.name for path in tmp_path.iterdir()) == ["corpus.yaml", "data"]  # its work dir is gone

    # A second run would replace that tokenizer: refused before any work, unless asked.
    line = one_error_line(genesis("tokenizer", "train", "--corpus", corpus, "--out", out))
    assert str(out / "tokenizer.model") in line and "--force" in line
    assert tree_digest(out) == after
    result = genesis("tokenizer", "train", "--corpus", corpus, "--out", out, "--force", "tokenizer.vocab_size=500")
    assert result.returncode == 0, result.stderr[-2000:]
    again = tree_digest(out)
    assert set(again) == set(after) and {name: again[name] for name in before} == before
    assert again["tokenizer.model"] != after["tokenizer.model"]


def test_tokenizer_train_refuses_to_overwrite_another_tokenizers_files(tmp_path):
    corpus = small_corpus(tmp_path / "corpus.yaml")
    export = tmp_path / "export"
    export.mkdir()
    (export / "tokenizer.json").write_text("{}")  # a model directory's tokenizer, without tokenizer.model
    line = one_error_line(genesis("tokenizer", "train", "--corpus", corpus, "--out", export))
    assert str(export) in line and "tokenizer.json" in line and "--force" in line
    assert (export / "tokenizer.json").read_text() == "{}"


def test_a_vocab_over_65536_is_refused_when_the_corpus_config_is_read(tmp_path):
    corpus = small_corpus(tmp_path / "corpus.yaml", vocab_size=70_000)
    for command in (["tokenizer", "train"], ["data", "prepare"]):
        out = tmp_path / f"out-{command[0]}"
        line = one_error_line(genesis(*command, "--corpus", corpus, "--out", out))
        assert "tokenizer.vocab_size" in line and "65536" in line and str(corpus) in line
        assert not out.exists()  # refused before reading a source


# ---------------------------------------------------------------------------------------------------------------
# The manifest records the HF twin


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A data directory as the data stage leaves it: tokenizer (with its HF twin), one shard, the manifest."""
    import gzip

    from data_prep.tokenizer import SentencePieceTokenizer, train_sentencepiece
    from genesis.manifest import Manifest, SourceEntry, TokenizerEntry, sha256_file, write_manifest, write_shard

    data = tmp_path_factory.mktemp("verify") / "data"
    with gzip.open(WEB, "rt", encoding="utf-8") as handle:
        texts = [json.loads(line)["text"] for line in handle][:200]
    model = train_sentencepiece([line for text in texts for line in text.split("\n")], data / "tokenizer",
                                vocab_size=400, threads=2)
    tokenizer = SentencePieceTokenizer(model)
    entry = write_shard(data / "web" / "shard_00000.arrow",
                        [ids + [tokenizer.eos_id] for ids in tokenizer.encode(texts)], eos_id=tokenizer.eos_id)
    entry.path = "web/shard_00000.arrow"
    write_manifest(data, Manifest(
        tokenizer=TokenizerEntry(path="tokenizer/tokenizer.model", sha256=sha256_file(model),
                                 vocab_size=tokenizer.vocab_size, eos_id=tokenizer.eos_id),
        sources=[SourceEntry(name="web", weight=1.0, shards=[entry])]))
    return data


def test_the_manifest_records_the_hf_tokenizer_and_verify_refuses_a_broken_one(data_dir, tmp_path):
    from genesis.errors import DataError
    from genesis.manifest import read_manifest, sha256_file, verify_data_dir

    data = shutil.copytree(data_dir, tmp_path / "data")
    manifest = read_manifest(data)
    assert manifest.tokenizer.hf_files == {
        name: sha256_file(data / name) for name in ("tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json")}
    verify_data_dir(data)

    twin = data / "tokenizer" / "tokenizer.json"
    twin.write_text(twin.read_text()[:1000])  # truncated
    with pytest.raises(DataError, match="tokenizer.json: checksum"):
        verify_data_dir(data)
    line = one_error_line(genesis("data", "verify", data))
    assert str(twin) in line and "genesis tokenizer hf" in line

    # The advice works: the twin is rewritten from tokenizer.model, byte for byte.
    result = genesis("tokenizer", "hf", data / "tokenizer")
    assert result.returncode == 0, result.stderr[-2000:]
    verify_data_dir(data)

    twin.unlink()
    with pytest.raises(DataError, match="tokenizer.json: .*missing"):
        verify_data_dir(data)


def test_a_manifest_written_before_the_hf_twin_was_recorded_still_loads_verifies_and_keeps_its_fingerprint(
        data_dir, tmp_path):
    from genesis.manifest import read_manifest, verify_data_dir

    data = shutil.copytree(data_dir, tmp_path / "data")
    recorded = read_manifest(data)
    path = data / "manifest.json"
    older = json.loads(path.read_text())
    del older["tokenizer"]["hf_files"]
    path.write_text(json.dumps(older))
    assert read_manifest(data).tokenizer.hf_files == {}
    assert verify_data_dir(data).fingerprint() == recorded.fingerprint()
