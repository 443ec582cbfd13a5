"""Tokenize clean parts into Arrow token shards, one job per part, resumably.

Each clean part (`clean/<source>/<part>.arrow`) becomes one token shard (`<source>/<part>.arrow`) holding its
documents that dedup kept. A shard's sidecar (`.<part>.json`, the manifest entry with the shard's path relative
to the data directory) is written after the shard itself was renamed into place. A rerun skips a part whose
shard still matches its sidecar (size and sha256: a shard `genesis data verify` found corrupt or truncated is
rebuilt) and redoes the rest.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_prep.executor import stage_job
from data_prep.tokenizer import encode_documents
from genesis.manifest import ShardEntry, ShardReader, sha256_file, write_shard

_TOKENIZERS: dict[str, object] = {}


def sidecar_of(shard_path: Path) -> Path:
    return shard_path.with_name(f".{shard_path.stem}.json")


def completed_entry(shard_path: Path, data_dir: Path | None = None, check_bytes: bool = False) -> ShardEntry | None:
    """The finished shard's manifest entry (path relative to `data_dir` when given), or None when it must be made.
    With `check_bytes`, a shard whose bytes no longer match the sidecar's sha256 counts as not finished."""
    sidecar = sidecar_of(shard_path)
    if not (shard_path.is_file() and sidecar.is_file()):
        return None
    entry = ShardEntry.model_validate_json(sidecar.read_text())
    if not shard_path.stat().st_size or not entry.sha256:
        return None
    if check_bytes and sha256_file(shard_path) != entry.sha256:
        return None
    if entry.max_token_id is None:
        # A sidecar from before the id was recorded: read it once here so the manifest carries it and the
        # trainer's start need not read the shard.
        entry.max_token_id = ShardReader(shard_path).max_token_id()
    if data_dir is not None and Path(entry.path).is_absolute():
        entry.path = str(Path(entry.path).relative_to(data_dir.resolve()))  # sidecars of older versions
    return entry


def _tokenizer(model_path: str):
    if model_path not in _TOKENIZERS:
        import sentencepiece as spm

        _TOKENIZERS[model_path] = spm.SentencePieceProcessor(model_file=model_path)
    return _TOKENIZERS[model_path]


def _batches(lengths: np.ndarray, max_docs: int, max_bytes: int) -> list[tuple[int, int]]:
    """[start, stop) row ranges of at most `max_docs` documents and, past the first, at most `max_bytes` of text:
    what one encode call holds as Python lists is bounded whatever the documents' length."""
    batches, start, size = [], 0, 0
    for row, length in enumerate(lengths.tolist()):
        if row > start and (row - start >= max_docs or size + length > max_bytes):
            batches.append((start, row))
            start, size = row, 0
        size += length
    batches.append((start, len(lengths)))
    return batches


@stage_job
def tokenize_part(part_path: str, shard_path: str, tokenizer_model: str, removed_rows_path: str, data_dir: str,
                  batch_docs: int = 512, batch_bytes: int = 1 << 18) -> dict:
    """One job: a clean part minus the rows dedup removed (`removed_rows_path`, absent when none) → a token shard
    plus its sidecar. Returns the manifest entry as a dict (`num_docs` 0 and no file when every document of the
    part was removed)."""
    data_dir_path = Path(data_dir).resolve()
    shard = Path(shard_path)
    done = completed_entry(shard, data_dir_path, check_bytes=True)
    if done is not None:
        return done.model_dump() | {"skipped": True, "docs": done.num_docs, "bytes": 0}
    sp = _tokenizer(tokenizer_model)
    eos = sp.eos_id()
    table = pa.ipc.open_file(pa.memory_map(part_path, "r")).read_all()
    keep = np.ones(table.num_rows, dtype=bool)
    if Path(removed_rows_path).is_file():
        keep[np.load(removed_rows_path)] = False
    texts = table.column("text").filter(pa.array(keep))
    if not len(texts):
        return {"path": str(shard.relative_to(data_dir_path)), "num_docs": 0, "num_tokens": 0, "sha256": "",
                "skipped": False, "docs": 0, "bytes": 0, "text_bytes": 0}
    text_lengths = pc.binary_length(texts).to_numpy(zero_copy_only=False)
    text_bytes = int(text_lengths.sum())
    documents = []
    for start, stop in _batches(text_lengths, batch_docs, batch_bytes):
        # One thread per process: parallelism comes from processes or Dask workers. Markers are ids only where
        # the chat renderer put them; any other text, literal "<|im_start|>" included, is text.
        for ids in encode_documents(sp, texts.slice(start, stop - start).to_pylist(), num_threads=1):
            ids.append(eos)
            # int32 arrays at once: as Python ints a batch's ids take 36 bytes a token (hence batches bounded in
            # bytes as well as documents: 512 of a part's long documents were the whole part, 1.2M ids, 43 MB)
            documents.append(np.array(ids, dtype=np.int32))
    entry = write_shard(shard, documents, eos_id=eos)
    entry.path = str(shard.resolve().relative_to(data_dir_path))
    sidecar = sidecar_of(shard)
    tmp = sidecar.with_name(sidecar.name + ".tmp")
    tmp.write_text(entry.model_dump_json())
    os.replace(tmp, sidecar)
    return entry.model_dump() | {"skipped": False, "docs": len(texts), "bytes": text_bytes, "text_bytes": text_bytes}


def dump_report(path: Path, report: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, ensure_ascii=False))
    os.replace(tmp, path)
