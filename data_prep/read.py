"""Read → normalise/filter → clean text parts and their MinHash band keys, one read unit at a time.

A source is split into read units that run independently (in parallel on the executor):

    local files          one unit per file; a source with a token_budget or max_docs is one unit reading its
                         files in order (the budget means "the first N", which only one reader can know)
    hub dataset          one unit per stream shard (`IterableDataset.shard`), up to `hub_read_units`, each
                         with an equal share of the source's budget
    builtin              one unit

A unit streams its records and writes a clean part every `docs_per_shard` documents, so its memory is bounded
by one part, never by the source. For each part it writes:

    clean/<source>/<unit>-<part>.arrow     columns text, dedup (what near-dedup compares, null when = text)
    sig/<source>/<unit>-<part>.bands.npy   (bands, n, 2) uint64: each band's (bucket key, row), sorted by key
    sig/<source>/<unit>-<part>.exact.npy   (n, 3) uint64: (hash hi, hash lo, row) of the normalised text, sorted

and when all its parts are written, `units/<source>/<unit>.json` (its parts, counts and the fingerprint of what
it read). A unit whose marker matches is skipped on a rerun; any other unit is redone from scratch, so a killed
run redoes only unfinished units. The fingerprint holds each file's size and mtime: a source file that changed
since the last run is read again.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import xxhash

from data_prep.clean import clean_text, normalise
from data_prep.dedup import MinHasher, band_keys, band_starts, words_of
from data_prep.executor import stage_job
from data_prep.sources import CleanConfig, CorpusConfig, SourceConfig, record_to_dedup_text, record_to_text
from genesis.chat import strip_marker_sentinels
from genesis.errors import DataError

BYTES_PER_TOKEN = 4  # the budget's estimate before tokenization; shards are cut to the budget in real tokens


@dataclass(frozen=True)
class ReadUnit:
    source_index: int
    source: str
    unit: int
    files: tuple[str, ...] = ()
    hub_shard: tuple[int, int] | None = None  # (index, count)
    budget_bytes: int | None = None
    max_docs: int | None = None
    fingerprint: str = ""
    size: int = 0  # bytes on disk, for progress

    @property
    def name(self) -> str:
        return f"u{self.unit:05d}"


def _file_fingerprint(path: Path) -> str:
    stat = path.stat()
    return f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}"


def plan_units(config: CorpusConfig) -> list[ReadUnit]:
    """Every source's read units, in source order (earlier sources win ties in dedup)."""
    from data_prep.sources import source_files

    units: list[ReadUnit] = []
    for index, source in enumerate(config.sources):
        budget = (int(source.token_budget * BYTES_PER_TOKEN * config.budget_read_margin)
                  if source.token_budget else None)
        common = dict(source_index=index, source=source.name)
        if source.kind == "builtin":
            units.append(ReadUnit(**common, unit=0, budget_bytes=budget, max_docs=source.max_docs,
                                  fingerprint=f"builtin:{source.subset or 'all'}"))
        elif source.kind == "local":
            files = source_files(source)
            fingerprints = [_file_fingerprint(path) for path in files]
            if budget or source.max_docs:
                units.append(ReadUnit(**common, unit=0, files=tuple(map(str, files)), budget_bytes=budget,
                                      max_docs=source.max_docs, fingerprint="|".join(fingerprints),
                                      size=sum(path.stat().st_size for path in files)))
            else:
                units += [ReadUnit(**common, unit=number, files=(str(path),), fingerprint=fingerprint,
                                   size=path.stat().st_size)
                          for number, (path, fingerprint) in enumerate(zip(files, fingerprints))]
        else:
            from data_prep.sources import hub_num_shards

            count = min(hub_num_shards(source), config.hub_read_units)
            identity = f"hub:{source.hub_id}:{source.subset}:{source.data_dir}:{source.split}"
            units += [ReadUnit(**common, unit=number, hub_shard=(number, count),
                               budget_bytes=math.ceil(budget / count) if budget else None,
                               max_docs=math.ceil(source.max_docs / count) if source.max_docs else None,
                               fingerprint=f"{identity}:{number}/{count}")
                      for number in range(count)]
    return units


def _records(unit: ReadUnit, source: SourceConfig, on_bad: str, counts: dict) -> Iterator[dict]:
    if source.kind == "builtin":
        from data_prep.builtin import builtin_texts

        yield from ({"text": text} for text in builtin_texts(source.subset or "all"))
    elif source.kind == "local":
        from data_prep.sources import iter_file_records

        for path in unit.files:
            yield from iter_file_records(Path(path), source, on_bad, counts)
    else:
        from data_prep.sources import iter_hub_records

        yield from iter_hub_records(source, *unit.hub_shard)


def exact_hashes(word_lists: list[list[str]]) -> np.ndarray:
    """(n, 2) uint64 xxh3-128 of each text's normalised form (lower-cased, whitespace collapsed), from its words
    (`dedup.words_of`, the split MinHash shingles too)."""
    out = np.empty((len(word_lists), 2), dtype=np.uint64)
    for row, words in enumerate(word_lists):
        digest = xxhash.xxh3_128_intdigest(" ".join(words).encode("utf-8"))
        out[row] = (digest >> 64, digest & 0xFFFFFFFFFFFFFFFF)
    return out


def write_signatures(stem: Path, dedup_texts: list[str], clean: CleanConfig) -> None:
    """The part's band keys and exact hashes, each sorted by key (the bucket phase slices them by hash range)."""
    hasher = MinHasher(num_perm=clean.num_perm, shingle_words=clean.shingle_words)
    starts = band_starts(clean.num_perm, clean.bands, clean.rows, clean.offset_bands)
    rows = np.arange(len(dedup_texts), dtype=np.uint64)
    words = [words_of(text) for text in dedup_texts]  # once, for the MinHash shingles and the exact hashes
    keys = band_keys(hasher.signatures_of_words(words), starts, clean.rows)
    bands = np.empty((len(starts), len(dedup_texts), 2), dtype=np.uint64)
    for column in range(len(starts)):
        order = np.lexsort((rows, keys[:, column]))
        bands[column, :, 0], bands[column, :, 1] = keys[order, column], rows[order]
    exact = np.concatenate([exact_hashes(words), rows[:, None]], axis=1)
    exact = exact[np.lexsort((exact[:, 2], exact[:, 1], exact[:, 0]))]
    for suffix, array in ((".bands.npy", bands), (".exact.npy", exact)):
        target = stem.with_name(stem.name + suffix)
        tmp = target.with_name(target.name + ".tmp")
        with open(tmp, "wb") as handle:
            np.save(handle, array)
        os.replace(tmp, target)


def write_clean_part(path: Path, texts: list[str], dedup_texts: list[str | None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    table = pa.table({"text": pa.array(texts, type=pa.large_string()),
                      "dedup": pa.array(dedup_texts, type=pa.large_string())})
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    os.replace(tmp, path)


def open_clean_part(path: Path) -> pa.Table:
    """A clean part, memory-mapped: rows are read only when taken."""
    return pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()


def unit_marker(data_dir: Path, unit: ReadUnit) -> Path:
    return data_dir / "units" / unit.source / f"{unit.name}.json"


def finished_unit(data_dir: Path, unit: ReadUnit, key: str) -> dict | None:
    """The unit's marker when it finished with this config on these inputs, and its parts are all there."""
    marker = unit_marker(data_dir, unit)
    if not marker.is_file():
        return None
    info = json.loads(marker.read_text())
    if info.get("key") != key or info.get("fingerprint") != unit.fingerprint:
        return None
    for part in info["parts"]:
        stem = data_dir / "sig" / unit.source / part
        if not ((data_dir / "clean" / unit.source / f"{part}.arrow").is_file()
                and stem.with_name(part + ".bands.npy").is_file() and stem.with_name(part + ".exact.npy").is_file()):
            return None
    return info


@stage_job
def read_unit(unit: ReadUnit, source: SourceConfig, clean: CleanConfig, docs_per_part: int, on_bad: str,
              data_dir: str, key: str) -> dict:
    """One read unit → clean parts with their signatures, then its marker. Returns the marker's content."""
    data_dir = Path(data_dir)
    done = finished_unit(data_dir, unit, key)
    if done is not None:
        return done | {"skipped": True, "bytes": unit.size, "docs": done["docs_clean"]}
    clean_dir, sig_dir = data_dir / "clean" / unit.source, data_dir / "sig" / unit.source
    clean_dir.mkdir(parents=True, exist_ok=True)
    sig_dir.mkdir(parents=True, exist_ok=True)
    unit_marker(data_dir, unit).unlink(missing_ok=True)
    for stale in [*clean_dir.glob(f"{unit.name}-*"), *sig_dir.glob(f"{unit.name}-*")]:
        stale.unlink()

    counts: Counter = Counter()
    read_counts: dict = {}
    texts: list[str] = []
    dedup_texts: list[str | None] = []
    parts: list[str] = []
    produced_docs = produced_bytes = 0

    def flush() -> None:
        part = f"{unit.name}-p{len(parts):05d}"
        write_signatures(sig_dir / part, [d if d is not None else t for t, d in zip(texts, dedup_texts)], clean)
        write_clean_part(clean_dir / f"{part}.arrow", texts, dedup_texts)
        parts.append(part)
        texts.clear()
        dedup_texts.clear()

    for index, record in enumerate(_records(unit, source, on_bad, read_counts)):
        try:
            if source.kind == "builtin":  # the project's own text, its dialogues already rendered for pretraining
                text = record["text"]
                dedup_text = strip_marker_sentinels(text)
            else:
                text = record_to_text(record, source)
                dedup_text = record_to_dedup_text(record, source)
        except (KeyError, TypeError, ValueError) as err:
            if on_bad == "fail":
                raise DataError(f"source '{source.name}' record {index + 1}: {err}; fix it or use "
                                f"on_bad_record: skip") from None
            counts["malformed_record"] += 1
            continue
        cleaned = clean_text(text, clean, counts)
        if cleaned is None:
            continue
        texts.append(cleaned)
        dedup_texts.append(None if dedup_text == text else normalise(dedup_text)[0])
        produced_docs += 1
        produced_bytes += len(cleaned.encode("utf-8"))
        if len(texts) >= docs_per_part:
            flush()
        if (unit.max_docs and produced_docs >= unit.max_docs) or \
                (unit.budget_bytes and produced_bytes >= unit.budget_bytes):
            break
    if texts:
        flush()
    counts.update(read_counts)
    info = {"key": key, "fingerprint": unit.fingerprint, "parts": parts, "docs_clean": produced_docs,
            "bytes_clean": produced_bytes, "counts": dict(counts)}
    marker = unit_marker(data_dir, unit)
    marker.parent.mkdir(parents=True, exist_ok=True)
    tmp = marker.with_name(marker.name + ".tmp")
    tmp.write_text(json.dumps(info, indent=1))
    os.replace(tmp, marker)
    return info | {"skipped": False, "bytes": unit.size or produced_bytes, "docs": produced_docs}
