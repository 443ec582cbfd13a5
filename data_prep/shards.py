"""Tokenize cleaned text parts into Arrow token shards, in parallel, resumably.

Each cleaned part (`clean/<source>/part_NNNNN.arrow`, one `text` column) becomes exactly one token shard
(`<source>/shard_NNNNN.arrow`). Parts are independent work items, run by a process pool on one machine or
by a Dask cluster beyond it. A shard's sidecar (`.shard_NNNNN.json`, the manifest entry) is written after
the shard itself was renamed into place: a rerun skips parts whose shard and sidecar both exist, and redoes
the rest.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pyarrow as pa

from genesis.errors import DataError
from genesis.manifest import ShardEntry, ShardReader, sha256_file, write_shard

_TOKENIZERS: dict[str, object] = {}


def write_text_part(path: Path, texts: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    table = pa.table({"text": pa.array(texts, type=pa.large_string())})
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    os.replace(tmp, path)


def read_text_part(path: Path) -> list[str]:
    with pa.memory_map(str(path), "r") as source:
        return pa.ipc.open_stream(source).read_all().column("text").to_pylist()


def sidecar_of(shard_path: Path) -> Path:
    return shard_path.with_name(f".{shard_path.stem}.json")


def completed_entry(shard_path: Path) -> ShardEntry | None:
    sidecar = sidecar_of(shard_path)
    if shard_path.is_file() and sidecar.is_file():
        entry = ShardEntry.model_validate_json(sidecar.read_text())
        if shard_path.stat().st_size and entry.sha256:
            if entry.max_token_id is None:
                # A sidecar from before the id was recorded: read it once here so the manifest carries it and
                # the trainer's start need not read the shard.
                entry.max_token_id = ShardReader(shard_path).max_token_id()
            return entry
    return None


def _tokenizer(model_path: str):
    if model_path not in _TOKENIZERS:
        import sentencepiece as spm

        _TOKENIZERS[model_path] = spm.SentencePieceProcessor(model_file=model_path)
    return _TOKENIZERS[model_path]


def tokenize_part(part_path: str, shard_path: str, tokenizer_model: str, batch_docs: int = 512) -> dict:
    """One work item: a text part → a token shard plus its sidecar. Returns the manifest entry as a dict."""
    shard = Path(shard_path)
    done = completed_entry(shard)
    if done is not None:
        return done.model_dump() | {"skipped": True}
    sp = _tokenizer(tokenizer_model)
    eos = sp.eos_id()
    texts = read_text_part(Path(part_path))
    documents = []
    for start in range(0, len(texts), batch_docs):
        # One thread per process: parallelism comes from processes (or Dask workers), one part each.
        for ids in sp.encode(texts[start : start + batch_docs], num_threads=1):
            ids.append(eos)
            documents.append(ids)
    entry = write_shard(shard, documents, eos_id=eos)
    sidecar = sidecar_of(shard)
    tmp = sidecar.with_name(sidecar.name + ".tmp")
    tmp.write_text(entry.model_dump_json())
    os.replace(tmp, sidecar)
    return entry.model_dump() | {"skipped": False}


def run_parallel(function, jobs: list[tuple], workers: int, executor: str = "process", dask_address: str | None = None) -> list:
    """Run independent jobs: in-process (1 worker), a process pool, or a Dask cluster."""
    if executor == "dask":
        from distributed import Client

        with Client(dask_address) if dask_address else Client(n_workers=workers, threads_per_worker=1,
                                                                processes=True, dashboard_address=None) as client:
            futures = [client.submit(function, *job, pure=False) for job in jobs]
            return client.gather(futures)
    if workers <= 1 or len(jobs) <= 1:
        return [function(*job) for job in jobs]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(function, *zip(*jobs)))


def tokenize_parts(data_dir: Path, tokenizer_model: Path, workers: int = 1, executor: str = "process",
                   dask_address: str | None = None) -> dict[str, list[ShardEntry]]:
    """Tokenize every cleaned part under data_dir/clean into data_dir/<source>/shard_*.arrow."""
    jobs, owners = [], []
    for source_dir in sorted((data_dir / "clean").iterdir()):
        for part in sorted(source_dir.glob("part_*.arrow")):
            shard = data_dir / source_dir.name / part.name.replace("part_", "shard_")
            jobs.append((str(part), str(shard), str(tokenizer_model)))
            owners.append(source_dir.name)
    if not jobs:
        raise DataError(f"{data_dir / 'clean'}: no cleaned text parts; the corpus is empty after filtering")
    results = run_parallel(tokenize_part, jobs, workers, executor, dask_address)
    by_source: dict[str, list[ShardEntry]] = {}
    for owner, result in zip(owners, results):
        result.pop("skipped", None)
        entry = ShardEntry.model_validate(result)
        entry.path = str(Path(entry.path).resolve().relative_to(data_dir.resolve()))
        by_source.setdefault(owner, []).append(entry)
    return by_source


def shard_checksum_ok(data_dir: Path, entry: ShardEntry) -> bool:
    return sha256_file(data_dir / entry.path) == entry.sha256


def dump_report(path: Path, report: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, ensure_ascii=False))
    os.replace(tmp, path)
