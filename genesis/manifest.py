"""The token-shard contract between the data stage (writer) and the trainer (reader). One implementation.

    <data_dir>/manifest.json
      version: 1
      tokenizer: {path, sha256, vocab_size, eos_id, hf_files}  paths relative to data_dir
      sources:   [{name, weight, shards: [{path, num_docs, num_tokens, sha256, max_token_id}]}]

`max_token_id` (the shard's largest token id, recorded by the writer) lets the trainer check the id range
without reading the tokens; manifests written before it existed lack it, and their shards are read instead.
`hf_files` (path → sha256) are the tokenizer's Hugging Face twin beside it (`tokenizer.json`, and
`tokenizer_config.json` with the chat template), which exports copy; manifests written before they were recorded
have none, and their twin is not checked.

A shard is an Arrow IPC *stream* file (what `datasets.Dataset.from_file` opens): one row per document, a
`tokens` column of uint16 lists, each ending in EOS. Shards are written under a temporary name and renamed
when complete, so a file at a manifest path is either whole or absent.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
from pydantic import Field, ValidationError

from genesis.config import StrictModel, format_validation_error
from genesis.errors import DataError

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
MAX_UINT16_VOCAB = 65_535
# The files beside tokenizer.model that transformers builds the tokenizer from (the HF twin).
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
TOKENS_SCHEMA = pa.schema([pa.field("tokens", pa.list_(pa.uint16()))])


class ShardEntry(StrictModel):
    path: str
    num_docs: int = Field(ge=0)
    num_tokens: int = Field(ge=0)
    sha256: str
    # None in manifests written before it was recorded: those shards are read to find it.
    max_token_id: int | None = Field(default=None, ge=0)


class SourceEntry(StrictModel):
    name: str
    weight: float = Field(gt=0)
    shards: list[ShardEntry]

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.shards)

    @property
    def num_docs(self) -> int:
        return sum(s.num_docs for s in self.shards)


class TokenizerEntry(StrictModel):
    path: str
    sha256: str
    vocab_size: int = Field(gt=0, le=MAX_UINT16_VOCAB + 1)
    eos_id: int = Field(ge=0)
    # The HF twin: path relative to data_dir → sha256; empty in manifests written before it was recorded.
    hf_files: dict[str, str] = Field(default_factory=dict)


class Manifest(StrictModel):
    version: int = MANIFEST_VERSION
    tokenizer: TokenizerEntry
    sources: list[SourceEntry] = Field(min_length=1)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.sources)

    def fingerprint(self) -> str:
        """Identifies the data: shard checksums, weights and tokenizer (not the directory it lives in)."""
        # max_token_id follows from the shard's bytes (already in sha256); leaving it out keeps the fingerprint
        # of data prepared before it was recorded, so those runs still resume without --reset-data.
        # The HF twin is made from tokenizer.model (in sha256), and is left out for the same reason.
        derived = {"sources": {"__all__": {"shards": {"__all__": {"max_token_id"}}}}, "tokenizer": {"hf_files"}}
        payload = json.dumps(self.model_dump(exclude=derived), sort_keys=True).encode()
        return hashlib.sha256(payload).hexdigest()[:16]


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(data_dir: str | Path) -> Manifest:
    path = Path(data_dir) / MANIFEST_NAME
    if not path.is_file():
        raise DataError(f"{path}: no manifest; run `genesis data prepare` to write token shards first")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON (line {err.lineno}); rerun `genesis data prepare`") from None
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as err:
        raise DataError(format_validation_error(err, str(path))) from None
    if manifest.version != MANIFEST_VERSION:
        raise DataError(f"{path}: manifest version {manifest.version}, this Genesis reads {MANIFEST_VERSION}")
    return manifest


def hf_tokenizer_checksums(data_dir: str | Path, tokenizer_path: str) -> dict[str, str]:
    """{path relative to data_dir: sha256} of the HF twin files beside the tokenizer model at `tokenizer_path`."""
    data_dir = Path(data_dir)
    beside = Path(tokenizer_path).parent
    return {str(beside / name): sha256_file(data_dir / beside / name) for name in HF_TOKENIZER_FILES
            if (data_dir / beside / name).is_file()}


def write_manifest(data_dir: str | Path, manifest: Manifest) -> Path:
    """Write manifest.json atomically. A tokenizer entry that names no HF twin gets the one beside its model
    (recorded in `manifest` too, so the manifest in hand is the one on disk)."""
    if not manifest.tokenizer.hf_files:
        manifest.tokenizer.hf_files = hf_tokenizer_checksums(data_dir, manifest.tokenizer.path)
    path = Path(data_dir) / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest.model_dump(), indent=2))
    os.replace(tmp, path)
    return path


def write_shard(path: str | Path, documents: list[list[int]] | list[np.ndarray], eos_id: int) -> ShardEntry:
    """Write documents (token id lists, each must end in EOS) as one Arrow stream shard, atomically.

    Returns the manifest entry with `path` as given (callers make it relative to the data dir).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lengths = np.fromiter((len(doc) for doc in documents), dtype=np.int64, count=len(documents))
    offsets = np.zeros(len(documents) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    values = np.empty(int(offsets[-1]), dtype=np.uint16)
    for doc, start, end in zip(documents, offsets[:-1], offsets[1:]):
        doc = np.asarray(doc)
        if doc.size == 0 or int(doc[-1]) != eos_id:
            raise DataError(f"{path}: a document does not end in EOS ({eos_id}); the shard writer needs whole documents")
        if doc.max(initial=0) > MAX_UINT16_VOCAB:
            raise DataError(f"{path}: token id {int(doc.max())} does not fit uint16; use a vocab of at most 65,536")
        values[start:end] = doc
    if offsets[-1] >= 2**31:
        raise DataError(f"{path}: {int(offsets[-1])} tokens is too many for one shard; write smaller shards")
    tokens = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values, type=pa.uint16()))
    table = pa.Table.from_arrays([tokens], schema=TOKENS_SCHEMA)
    tmp = path.with_name(path.name + ".tmp")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=65_536)
    os.replace(tmp, path)
    return ShardEntry(path=str(path), num_docs=len(documents), num_tokens=int(offsets[-1]), sha256=sha256_file(path),
                      max_token_id=int(values.max(initial=0)))


class ShardReader:
    """Zero-copy view of one shard: `doc(i)` is a uint16 numpy view into the memory-mapped file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"{self.path}: shard missing; rerun `genesis data prepare` (it redoes missing shards)")
        try:
            source = pa.memory_map(str(self.path), "r")
            table = pa.ipc.open_stream(source).read_all()
        except (pa.ArrowInvalid, OSError) as err:
            raise DataError(f"{self.path}: not a readable Arrow shard ({err}); rerun `genesis data prepare`") from None
        if table.schema.names != ["tokens"]:
            raise DataError(f"{self.path}: expected one 'tokens' column, found {table.schema.names}")
        # Offsets index into each chunk's values buffer; both are views of the mapped file (no copy).
        self._values = [chunk.values.to_numpy(zero_copy_only=True) for chunk in table.column("tokens").chunks]
        self._offsets = [chunk.offsets.to_numpy().astype(np.int64) for chunk in table.column("tokens").chunks]
        self._chunk_starts = np.cumsum([0] + [len(offsets) - 1 for offsets in self._offsets])
        self.num_docs = int(self._chunk_starts[-1])
        self.lengths = np.concatenate([np.diff(o) for o in self._offsets]) if self._offsets else np.zeros(0, np.int64)

    def doc(self, index: int) -> np.ndarray:
        chunk = int(np.searchsorted(self._chunk_starts, index, side="right") - 1)
        local = index - self._chunk_starts[chunk]
        offsets = self._offsets[chunk]
        return self._values[chunk][offsets[local]:offsets[local + 1]]

    def max_token_id(self) -> int:
        """The largest token id in the shard, read from the tokens themselves (one pass over the mapped file)."""
        return max((int(values[offsets[0]:offsets[-1]].max(initial=0))
                    for values, offsets in zip(self._values, self._offsets)), default=0)


def verify_data_dir(data_dir: str | Path, check_checksums: bool = True, read_token_ids: bool = True) -> Manifest:
    """Check that every shard exists with the manifest's checksum and counts, that every token id is below the
    tokenizer's vocab_size, and that the tokenizer and its HF twin match.

    `read_token_ids`: find each shard's largest id by reading its tokens (and refuse a manifest whose recorded
    `max_token_id` differs), as `genesis data verify` does; off, the recorded id is trusted (the trainer's
    start stays cheap) and only shards without one are read."""
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    tokenizer_path = data_dir / manifest.tokenizer.path
    if not tokenizer_path.is_file():
        raise DataError(f"{tokenizer_path}: tokenizer named by the manifest is missing; rerun `genesis data prepare`")
    if check_checksums and sha256_file(tokenizer_path) != manifest.tokenizer.sha256:
        raise DataError(f"{tokenizer_path}: checksum differs from the manifest; the shards belong to another tokenizer")
    for relative, sha256 in manifest.tokenizer.hf_files.items():
        path = data_dir / relative
        rewrite = f"rewrite it from tokenizer.model with `genesis tokenizer hf {path.parent}`"
        if not path.is_file():
            raise DataError(f"{path}: the manifest's Hugging Face tokenizer file is missing; {rewrite}")
        if check_checksums and sha256_file(path) != sha256:
            raise DataError(f"{path}: checksum differs from the manifest (a changed or broken Hugging Face "
                            f"tokenizer); {rewrite}")
    for source in manifest.sources:
        for shard in source.shards:
            path = data_dir / shard.path
            if not path.is_file():
                raise DataError(f"{path}: shard missing; rerun `genesis data prepare` to rebuild it")
            if check_checksums and sha256_file(path) != shard.sha256:
                raise DataError(f"{path}: checksum mismatch (corrupt or modified); rerun `genesis data prepare`")
            reader = ShardReader(path)
            if reader.num_docs != shard.num_docs or int(reader.lengths.sum()) != shard.num_tokens:
                raise DataError(
                    f"{path}: holds {reader.num_docs} docs / {int(reader.lengths.sum())} tokens, manifest says "
                    f"{shard.num_docs} / {shard.num_tokens}; rerun `genesis data prepare`"
                )
            check_token_ids(path, shard, reader, manifest.tokenizer.vocab_size, read_token_ids)
    return manifest


def check_token_ids(path: Path, shard: ShardEntry, reader: ShardReader, vocab_size: int, read: bool) -> None:
    """Refuse a shard holding an id the tokenizer cannot have made: the model's embedding lookup would fail on it
    mid-run (an IndexError deep in torch) or, with a larger model vocab, train rows no tokenizer produces."""
    if read or shard.max_token_id is None:
        max_id = reader.max_token_id()
        if shard.max_token_id is not None and shard.max_token_id != max_id:
            raise DataError(f"{path}: holds token ids up to {max_id}, manifest records {shard.max_token_id}; "
                            f"rerun `genesis data prepare`")
    else:
        max_id = shard.max_token_id
    if max_id >= vocab_size:
        raise DataError(f"{path}: token id {max_id} is outside the tokenizer's vocab_size {vocab_size} "
                        f"(manifest.json); the shard was made with another tokenizer: rerun `genesis data prepare`")
