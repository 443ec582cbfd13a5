"""Exact and near dedup across the whole corpus and across sources, out of core.

The shape is datatrove's and NeMo-Curator's: signatures per part on disk (written by `data_prep.read`) →
buckets grouped on disk → candidate pairs → exact-Jaccard verification → connected components → a removal
list. Each step is a list of jobs with its own output file, so a killed run redoes only unfinished jobs.

    bucket jobs   one per (band, hash range) and per exact-hash range: the slice [r·2^64/R, (r+1)·2^64/R) of
                  that band's keys from every part (a binary search in each part's sorted keys, memory-mapped),
                  sorted, and its runs of equal keys turned into pairs (`dedup.bucket_pairs`). R is chosen so a
                  slice holds about `shuffle_rows` keys: a job's memory is bounded however large the corpus.
                  → dedup/buckets/<band>_<range>.npy
    verify jobs   chunks of candidate pairs, sorted by document: both documents' shingle sets from their clean
                  parts (only those rows are read), linked when their exact Jaccard reaches `near_min_jaccard`.
                  → dedup/verified/chunk<pairs per chunk>_<chunk>.npy
    components    scipy's connected components over the verified links; each component keeps its earliest
                  document (earlier sources, then earlier units and rows, win). Exact duplicates are linked to
                  their group's first document without verification (128-bit hashes of the normalised text).
                  → dedup/removed.parquet: source, part, row, kind, kept_source, kept_part, kept_row

Documents are numbered gid = part_index << 32 | row, with parts in corpus order.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_prep.dedup import MinHasher, bucket_pairs, jaccard_of_sorted
from data_prep.executor import Executor, stage_job
from data_prep.read import open_clean_part

EXACT = -1  # the "band" index of the exact-hash bucket jobs
REMOVED_NAME = "removed.parquet"


@dataclass(frozen=True)
class Part:
    index: int
    source: str
    name: str

    def clean_path(self, data_dir: Path) -> Path:
        return data_dir / "clean" / self.source / f"{self.name}.arrow"

    def sig_path(self, data_dir: Path, kind: str) -> Path:
        return data_dir / "sig" / self.source / f"{self.name}.{kind}.npy"


def _save(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        np.save(handle, array)
    os.replace(tmp, path)


def _range_bounds(index: int, count: int) -> tuple[int, int | None]:
    step = (1 << 64) // count
    return index * step, (None if index == count - 1 else (index + 1) * step)


PARTS_NAME = "parts.json"


def _write_parts(work: Path, parts: list[Part]) -> Path:
    """The corpus's parts, written once for every job to read: a job's arguments stay the same size however many
    parts there are (passed to each job, the list made the driver and the task graph grow with the corpus)."""
    path = work / PARTS_NAME
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps([[part.index, part.source, part.name] for part in parts]))
    os.replace(tmp, path)
    return path


@functools.lru_cache(maxsize=4)
def _parts_of(path: str, stamp: tuple[int, int]) -> dict[int, Part]:
    return {index: Part(index, source, name) for index, source, name in json.loads(Path(path).read_text())}


def read_parts(parts_file: str) -> dict[int, Part]:
    """index → Part, from the file `_write_parts` wrote (read once per worker process while it is unchanged)."""
    stat = os.stat(parts_file)
    return _parts_of(parts_file, (stat.st_mtime_ns, stat.st_size))


@functools.lru_cache(maxsize=65_536)
def _npy_layout(path: str, stamp: tuple[int, int]) -> tuple[tuple[int, ...], np.dtype, int]:
    with open(path, "rb") as handle:
        major, _ = np.lib.format.read_magic(handle)
        read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(handle)
        return shape, dtype, handle.tell()


def _map_signatures(path: Path) -> np.ndarray:
    """A part's signature array (.npy), memory-mapped. NOTE: np.memmap from a header read once per worker, not
    np.load: every bucket job maps every part, so at 3 GB (714 parts, 13 hash ranges, 28 bands) that was 260,000
    np.load calls, each ~4x as long as a memmap from a known header (0.56 vs 0.13 ms per part in a
    micro-benchmark), which made dedup grow faster than the corpus."""
    stat = os.stat(path)
    shape, dtype, offset = _npy_layout(str(path), (stat.st_mtime_ns, stat.st_size))
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


@stage_job
def bucket_job(band: int, hash_range: int, ranges: int, parts_file: str, data_dir: str, max_bucket_comparisons: int,
               out: str) -> dict:
    """One band's (or the exact hashes') keys in one hash range, from every part → pairs sharing a bucket."""
    target = Path(out)
    if target.is_file():
        return {"skipped": True, "docs": 0}
    kind = "exact" if band == EXACT else "bands"
    parts = [(index, part.sig_path(Path(data_dir), kind)) for index, part in read_parts(parts_file).items()]
    low, high = _range_bounds(hash_range, ranges)
    keys, extra, gids = [], [], []
    for part_index, path in parts:
        array = _map_signatures(path)
        column = array[:, 0] if band == EXACT else array[band, :, 0]
        start = int(np.searchsorted(column, np.uint64(low), side="left"))
        stop = len(column) if high is None else int(np.searchsorted(column, np.uint64(high), side="left"))
        if stop <= start:
            continue
        # a copy, so the part's memory map closes now instead of staying mapped (and resident) until the job ends
        block = np.array(array[start:stop] if band == EXACT else array[band, start:stop])
        keys.append(block[:, 0])
        if band == EXACT:
            extra.append(block[:, 1])
        gids.append((np.uint64(part_index) << np.uint64(32)) | block[:, -1])
    if not keys:
        pairs = np.empty((0, 2), dtype=np.uint64)
    else:
        key, gid = np.concatenate(keys), np.concatenate(gids)
        if band == EXACT:
            low_bits = np.concatenate(extra)
            order = np.lexsort((gid, low_bits, key))
            key, low_bits, gid = key[order], low_bits[order], gid[order]
            # Exact groups: every member paired with the group's first (earliest) document.
            new_group = np.concatenate([[True], (key[1:] != key[:-1]) | (low_bits[1:] != low_bits[:-1])])
            first = gid[np.maximum.accumulate(np.where(new_group, np.arange(len(gid)), 0))]
            pairs = np.stack([first[~new_group], gid[~new_group]], axis=1)
        else:
            order = np.lexsort((gid, key))
            pairs = np.unique(bucket_pairs(key[order], gid[order], max_bucket_comparisons), axis=0)
    _save(target, pairs.astype(np.uint64))
    return {"skipped": False, "docs": int(sum(len(k) for k in keys))}


def _dedup_shingles(data_dir: Path, parts: dict[int, Part], gids: np.ndarray, hasher: MinHasher) -> dict[int, np.ndarray]:
    """The shingle set near-dedup compares for each gid, reading only those rows of their clean parts.

    NOTE: part by part, each text dropped once shingled: holding a verification chunk's ~4,000 texts as Python
    strings at once (up to 4 bytes a character) with Arrow's copies of them cost ~100 MB for 16 MB of text
    (measured on a 1 GB corpus's chunks): the largest job of the stage, and what set the workers' peak."""
    shingles: dict[int, np.ndarray] = {}
    part_of = gids >> np.uint64(32)
    for part_index in np.unique(part_of):
        wanted = gids[part_of == part_index]
        rows = (wanted & np.uint64(0xFFFFFFFF)).astype(np.int64)
        table = open_clean_part(parts[int(part_index)].clean_path(data_dir)).take(pa.array(rows))
        for gid, text, dedup in zip(wanted.tolist(), table.column("text").to_pylist(), table.column("dedup").to_pylist()):
            shingles[gid] = hasher.shingles(dedup if dedup is not None else text)
        del table
    return shingles


@stage_job
def verify_job(pairs: np.ndarray, parts_file: str, data_dir: str, shingle_words: int, min_jaccard: float,
               out: str) -> dict:
    """A chunk of candidate pairs → whether each pair's shingle sets reach `min_jaccard`."""
    target = Path(out)
    if target.is_file():
        return {"skipped": True, "docs": 0}
    parts = read_parts(parts_file)
    hasher = MinHasher(num_perm=8, shingle_words=shingle_words)  # only its shingling is used here
    shingles = _dedup_shingles(Path(data_dir), parts, np.unique(pairs), hasher)
    linked = np.fromiter((jaccard_of_sorted(shingles[a], shingles[b]) >= min_jaccard for a, b in pairs.tolist()),
                         dtype=bool, count=len(pairs))
    _save(target, linked)
    return {"skipped": False, "docs": len(shingles)}


def _components(nodes_from: np.ndarray, nodes_to: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(document, its component's earliest document) for every document on a link."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    nodes, inverse = np.unique(np.concatenate([nodes_from, nodes_to]), return_inverse=True)
    edges = inverse.reshape(2, -1)
    graph = coo_matrix((np.ones(edges.shape[1], dtype=np.int8), (edges[0], edges[1])), shape=(len(nodes),) * 2)
    _, labels = connected_components(graph, directed=False)
    earliest = np.full(labels.max() + 1 if len(labels) else 0, np.iinfo(np.uint64).max, dtype=np.uint64)
    np.minimum.at(earliest, labels, nodes)
    return nodes, earliest[labels]


def deduplicate_parts(data_dir: Path, parts: list[Part], clean, executor: Executor, shuffle_rows: int,
                      verify_pairs_per_job: int, total_docs: int, max_bucket_comparisons: int = 16) -> dict:
    """Run the dedup phase over `parts` (each job skipped when its output exists); write removed.parquet.
    Returns counts per source: exact and near removals, and candidate / verified pair totals."""
    from data_prep.dedup import band_starts

    work = data_dir / "dedup"
    for folder in ("buckets", "verified"):
        (work / folder).mkdir(parents=True, exist_ok=True)
    ranges = max(1, -(-total_docs // shuffle_rows))
    parts_file = str(_write_parts(work, parts))
    bands = band_starts(clean.num_perm, clean.bands, clean.rows, clean.offset_bands) if clean.near_dedup else []
    jobs = []
    if clean.exact_dedup:
        jobs += [(EXACT, r, ranges, parts_file, str(data_dir), max_bucket_comparisons,
                  str(work / "buckets" / f"exact_{r:05d}.npy")) for r in range(ranges)]
    jobs += [(band, r, ranges, parts_file, str(data_dir), max_bucket_comparisons,
              str(work / "buckets" / f"band{band:02d}_{r:05d}.npy"))
             for band in range(len(bands)) for r in range(ranges)]
    executor.map(bucket_job, jobs, "dedup: buckets")

    def load(prefix: str) -> np.ndarray:
        arrays = [np.load(path) for path in sorted((work / "buckets").glob(f"{prefix}*.npy"))]
        arrays = [a for a in arrays if len(a)]
        return np.concatenate(arrays) if arrays else np.empty((0, 2), dtype=np.uint64)

    exact = load("exact_")  # (group's first, member) for every exact copy
    candidates = load("band")
    if len(candidates) and len(exact):
        # A candidate whose document is an exact copy stands for the copy's first (same text, same shingles).
        order = np.argsort(exact[:, 1])
        members, firsts = exact[order, 1], exact[order, 0]
        for column in (0, 1):
            position = np.minimum(np.searchsorted(members, candidates[:, column]), len(members) - 1)
            hit = members[position] == candidates[:, column]
            candidates[hit, column] = firsts[position[hit]]
        candidates = np.sort(candidates, axis=1)
        candidates = candidates[candidates[:, 0] != candidates[:, 1]]
    candidates = np.unique(candidates, axis=0) if len(candidates) else candidates

    chunks = [candidates[start : start + verify_pairs_per_job] for start in range(0, len(candidates), verify_pairs_per_job)]
    # A chunk's file names its size: a run resumed with another `dedup_verify_pairs` cuts the candidates
    # differently, and must neither reuse nor keep the other size's chunks.
    prefix = f"chunk{verify_pairs_per_job}_"
    for stale in (work / "verified").glob("*.npy"):
        if not stale.name.startswith(prefix):
            stale.unlink()
    chunk_paths = [work / "verified" / f"{prefix}{number:06d}.npy" for number in range(len(chunks))]
    executor.map(verify_job, [(chunk, parts_file, str(data_dir), clean.shingle_words, clean.near_min_jaccard, str(path))
                              for chunk, path in zip(chunks, chunk_paths)],
                 "dedup: verify pairs")
    linked = np.concatenate([np.load(path) for path in chunk_paths]) if chunks else np.zeros(0, dtype=bool)
    links = candidates[linked]

    # The driver holds arrays the size of the duplicates found, never of the corpus.
    removed, kept, is_near = exact[:, 1], exact[:, 0], np.zeros(len(exact), dtype=bool)
    if len(links):
        nodes, earliest = _components(links[:, 0], links[:, 1])
        near = nodes != earliest
        removed = np.concatenate([removed, nodes[near]])
        kept = np.concatenate([kept, earliest[near]])
        is_near = np.concatenate([is_near, np.ones(int(near.sum()), dtype=bool)])
    order = np.argsort(removed, kind="stable")
    removed, kept, is_near = removed[order], kept[order], is_near[order]
    _write_removed(work, parts, removed, kept, is_near)
    return {"candidate_pairs": int(len(candidates)), "verified_links": int(len(links)),
            "exact_duplicates": int((~is_near).sum()), "near_duplicates": int(is_near.sum()),
            "hash_ranges": ranges, "bands": len(bands)}


def _write_removed(work: Path, parts: list[Part], removed: np.ndarray, kept: np.ndarray, is_near: np.ndarray) -> None:
    """removed.parquet (every removed document and the one kept for it) and, per part with removals,
    removed/<part index>.npy (its removed rows, sorted), which the tokenize job of that part reads alone."""
    sources = pa.array([part.source for part in parts], pa.string())
    names = pa.array([part.name for part in parts], pa.string())

    def describe(gids: np.ndarray) -> tuple[pa.Array, pa.Array, np.ndarray]:
        owner = pa.array((gids >> np.uint64(32)).astype(np.int64))
        return sources.take(owner), names.take(owner), (gids & np.uint64(0xFFFFFFFF)).astype(np.int64)

    source, part, row = describe(removed)
    kept_source, kept_part, kept_row = describe(kept)
    table = pa.table({"source": source, "part": part, "row": row,
                      "kind": pa.array(np.where(is_near, "near", "exact").tolist() if len(is_near) else [], pa.string()),
                      "kept_source": kept_source, "kept_part": kept_part, "kept_row": kept_row})
    tmp = work / f".{REMOVED_NAME}.tmp"
    pq.write_table(table, tmp)
    by_part = work / "removed"
    shutil.rmtree(by_part, ignore_errors=True)
    by_part.mkdir()
    owners = removed >> np.uint64(32)
    boundaries = np.flatnonzero(np.diff(owners)) + 1
    for rows in np.split(removed, boundaries) if len(removed) else []:
        _save(by_part / f"{int(rows[0] >> np.uint64(32)):07d}.npy", (rows & np.uint64(0xFFFFFFFF)).astype(np.int64))
    os.replace(tmp, work / REMOVED_NAME)


def read_removed(data_dir: Path) -> pa.Table:
    return pq.read_table(data_dir / "dedup" / REMOVED_NAME)


def removed_rows(data_dir: Path, part: Part) -> np.ndarray:
    """The rows of `part` that dedup removed (sorted), from the part's own small file."""
    path = data_dir / "dedup" / "removed" / f"{part.index:07d}.npy"
    return np.load(path) if path.is_file() else np.empty(0, dtype=np.int64)


def removed_counts(data_dir: Path) -> dict[tuple[str, str], int]:
    """(source, kind) → documents removed, counted by Arrow without a Python object per row."""
    counts = read_removed(data_dir).group_by(["source", "kind"]).aggregate([("row", "count")])
    return {(s, k): n for s, k, n in zip(counts.column("source").to_pylist(), counts.column("kind").to_pylist(),
                                         counts.column("row_count").to_pylist())}


def reset(data_dir: Path) -> None:
    shutil.rmtree(data_dir / "dedup", ignore_errors=True)


def write_key(data_dir: Path, key: str) -> None:
    (data_dir / "dedup").mkdir(parents=True, exist_ok=True)
    (data_dir / "dedup" / "KEY.json").write_text(json.dumps({"key": key}))


def has_key(data_dir: Path, key: str) -> bool:
    path = data_dir / "dedup" / "KEY.json"
    return path.is_file() and json.loads(path.read_text()).get("key") == key
