"""Exact and near-duplicate removal.

Exact: documents whose normalised form (lower-cased, whitespace collapsed) hashes equal; the first is kept.

Near: MinHash over word 5-gram shingles with 112 permutations and LSH with 14 bands × 8 rows (datatrove's
defaults; the S-curve's threshold sits near Jaccard 0.72), plus the 13 bands offset by half a band over the same
signature. Documents sharing a bucket are candidates; a candidate pair is linked when the exact Jaccard
similarity of its shingle sets reaches `min_jaccard`. Clusters are the connected components, and each cluster
keeps its first document.

Speed: signatures are computed for many documents at once. Shingle hashes of a whole batch are one uint64
vector; each permutation is a multiply-shift hash ((a·x + b) mod 2^64) >> 32 with random odd a, applied to the
whole vector, and `np.minimum.reduceat` takes every document's minimum in one pass. No Python loop runs per
shingle or per document inside the permutations.
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass, field

import numpy as np


def words_of(text: str) -> list[str]:
    """Words are whitespace-separated tokens, lower-cased (datasketch's and datatrove's usual shingling).
    NOTE: str.split(), not a regex: the same words (Unicode whitespace both ways), twice as fast."""
    return text.lower().split()


def exact_key(text: str) -> bytes:
    return hashlib.blake2b(" ".join(words_of(text)).encode("utf-8"), digest_size=16).digest()


@dataclass
class MinHasher:
    num_perm: int = 112
    shingle_words: int = 5
    seed: int = 1
    a: np.ndarray = field(init=False)
    b: np.ndarray = field(init=False)

    def __post_init__(self):
        rng = np.random.default_rng(self.seed)
        self.a = rng.integers(0, 2**63, size=self.num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)  # odd
        self.b = rng.integers(0, 2**63, size=self.num_perm, dtype=np.uint64)

    def shingles(self, text: str, distinct: bool = True) -> np.ndarray:
        """Distinct 64-bit hashes of the document's lower-cased word n-grams (sorted). `distinct=False`: every
        n-gram's hash in document order, repeats kept: a MinHash signature is a minimum, which repeats leave
        unchanged, and skipping the sort is a tenth of the read stage."""
        return self.shingles_of_words(words_of(text), distinct)

    def shingles_of_words(self, words: list[str], distinct: bool = True) -> np.ndarray:
        """`shingles` of a text already split by `words_of`."""
        if not words:
            return np.zeros(1, dtype=np.uint64)
        # map() over C functions: no Python frame per word (this line was the read stage's largest cost).
        word_hashes = np.fromiter(map(zlib.crc32, map(str.encode, words)), dtype=np.uint64, count=len(words))
        n = self.shingle_words
        if len(words) < n:
            n = len(words)
        # Polynomial combination of n consecutive 32-bit word hashes, vectorised over positions.
        combined = np.zeros(len(words) - n + 1, dtype=np.uint64)
        for offset in range(n):
            combined = combined * np.uint64(1_000_003) + word_hashes[offset : len(words) - n + 1 + offset]
        return np.unique(combined) if distinct else combined

    def signatures(self, texts: list[str]) -> np.ndarray:
        """(len(texts), num_perm) uint32 MinHash signatures."""
        return self.signatures_of_words([words_of(text) for text in texts])

    def signatures_of_words(self, word_lists: list[list[str]]) -> np.ndarray:
        """`signatures` of texts already split by `words_of`."""
        return self.signatures_of([self.shingles_of_words(words, distinct=False) for words in word_lists])

    # Shingles hashed together: 32,768 × 8 bytes, so the arrays each permutation streams stay in a core's L2.
    BLOCK_SHINGLES = 1 << 15

    def signatures_of(self, shingle_sets: list[np.ndarray]) -> np.ndarray:
        """Signatures of precomputed shingle sets (the caller keeps the sets to verify candidate pairs).

        NOTE: documents are hashed in blocks of about BLOCK_SHINGLES shingles, in place: over a whole part at
        once, each of the num_perm passes streamed three part-sized temporaries through memory, so the read
        stage was bound by memory bandwidth (3-4× slower per core, and two workers on one box slowed each other:
        1.52× one worker's read speed, bench/data_scale.py). The signatures are the same."""
        out = np.empty((len(shingle_sets), self.num_perm), dtype=np.uint32)
        shift = np.uint64(32)
        first = 0
        while first < len(shingle_sets):
            last, size = first + 1, len(shingle_sets[first])  # a document longer than a block is a block
            while last < len(shingle_sets) and size + len(shingle_sets[last]) <= self.BLOCK_SHINGLES:
                size += len(shingle_sets[last])
                last += 1
            block = shingle_sets[first:last]
            starts = np.zeros(len(block), dtype=np.int64)
            np.cumsum([len(s) for s in block[:-1]], out=starts[1:])
            flat = np.concatenate(block)
            hashed = np.empty_like(flat)
            with np.errstate(over="ignore"):  # wrap-around modulo 2^64 is the hash
                for perm in range(self.num_perm):
                    np.multiply(flat, self.a[perm], out=hashed)
                    np.add(hashed, self.b[perm], out=hashed)
                    np.right_shift(hashed, shift, out=hashed)
                    out[first:last, perm] = np.minimum.reduceat(hashed, starts)
            first = last
        return out


class _UnionFind:
    def __init__(self, n: int):
        self.parent = np.arange(n)

    def find(self, x: int) -> int:
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, x: int, y: int) -> None:
        rx, ry = self.find(x), self.find(y)
        if rx != ry:
            self.parent[max(rx, ry)] = min(rx, ry)  # the earlier document stays the representative


def band_starts(num_perm: int, bands: int, rows: int, offset_bands: bool = True) -> list[int]:
    """First permutation of each band: the `bands` aligned bands [0, rows), [rows, 2·rows), …, and with
    `offset_bands` the bands shifted by half a band ([rows/2, 3·rows/2), …) that fit in the signature."""
    if bands * rows > num_perm:
        raise ValueError(f"bands × rows = {bands * rows} exceeds the {num_perm} permutations")
    starts = [band * rows for band in range(bands)]
    if offset_bands and rows > 1:
        starts += [rows // 2 + band * rows for band in range(bands) if rows // 2 + (band + 1) * rows <= num_perm]
    return starts


_BAND_MULTIPLIERS = np.random.default_rng(0x6E6573).integers(1, 2**62, size=64, dtype=np.uint64) * np.uint64(2) + np.uint64(1)


def band_keys(signatures: np.ndarray, starts: list[int], rows: int) -> np.ndarray:
    """(n, len(starts)) uint64: each band's `rows` signature values folded into one 64-bit bucket key.

    Equal bands give equal keys; unequal bands collide with probability ~2^-64, and a collision only proposes a
    pair that verification then rejects."""
    n = len(signatures)
    keys = np.empty((n, len(starts)), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for column, start in enumerate(starts):
            key = np.full(n, np.uint64(0x9E3779B97F4A7C15), dtype=np.uint64)
            for row in range(rows):
                key = (key ^ signatures[:, start + row].astype(np.uint64)) * _BAND_MULTIPLIERS[row % 64]
            keys[:, column] = key ^ (key >> np.uint64(31))
    return keys


def bucket_pairs(keys: np.ndarray, ids: np.ndarray, max_bucket_comparisons: int = 16) -> np.ndarray:
    """(m, 2) uint64 pairs (earlier id, later id) of documents sharing a bucket; `keys` and `ids` sorted by
    (key, id). Each document is paired with up to `max_bucket_comparisons` earlier members of its bucket, so a
    dissimilar document in the middle of a bucket cannot hide two similar ones from each other, and huge buckets
    (boilerplate shared by thousands of pages) stay linear."""
    n = len(keys)
    if n < 2:
        return np.empty((0, 2), dtype=np.uint64)
    new_run = np.concatenate([[True], keys[1:] != keys[:-1]])
    run_start = np.maximum.accumulate(np.where(new_run, np.arange(n), 0))
    position = np.arange(n)
    pairs = []
    for back in range(1, max_bucket_comparisons + 1):
        later = position[position - back >= run_start]
        if not len(later):
            break
        pairs.append(np.stack([ids[later - back], ids[later]], axis=1))
    return np.concatenate(pairs).astype(np.uint64) if pairs else np.empty((0, 2), dtype=np.uint64)


def candidate_pairs(signatures: np.ndarray, bands: int, rows: int, offset_bands: bool = True,
                    max_bucket_comparisons: int = 16) -> set[tuple[int, int]]:
    """Pairs (i < j) of an in-memory collection that share a band bucket (`band_starts`, `bucket_pairs`).

    The offset bands reuse the same signature, so they cost no hashing, and they give a pair near the S-curve's
    threshold a second set of chances: datasketch-style LSH with 14 × 8 finds only ~77% of pairs at Jaccard
    0.75. The extra candidates are safe only because every pair is then verified (`near_duplicate_clusters`).
    The corpus-scale stage (`data_prep.dedup_parts`) runs the same functions on hash-range slices from disk.
    """
    n, num_perm = signatures.shape
    starts = band_starts(num_perm, bands, rows, offset_bands)
    keys = band_keys(signatures, starts, rows)
    ids = np.arange(n, dtype=np.uint64)
    pairs: set[tuple[int, int]] = set()
    for column in range(len(starts)):
        order = np.lexsort((ids, keys[:, column]))
        found = bucket_pairs(keys[order, column], ids[order], max_bucket_comparisons)
        pairs.update(zip(found[:, 0].tolist(), found[:, 1].tolist()))
    return pairs


def jaccard_of_sorted(x: np.ndarray, y: np.ndarray) -> float:
    """Exact Jaccard similarity of two sorted arrays of distinct shingle hashes."""
    shared = len(np.intersect1d(x, y, assume_unique=True))
    return shared / (len(x) + len(y) - shared)


def near_duplicate_clusters(signatures: np.ndarray, shingle_sets: list[np.ndarray], bands: int, rows: int,
                            min_jaccard: float = 0.65, offset_bands: bool = True) -> np.ndarray:
    """Representative (first member's index) of each document's cluster.

    LSH proposes pairs (`candidate_pairs`); a pair is linked only if the exact Jaccard similarity of its shingle
    sets is at least `min_jaccard`. The exact check drops accidental band collisions and keeps chains from
    joining dissimilar documents, without the ±0.04 noise of a signature-agreement estimate, which rejected
    genuine copies when it was the check (BENCHMARKS.md, data stage). The default 0.65 sits a little under the
    14 × 8 S-curve's threshold (≈ 0.72), so verification removes what LSH proposed by accident, not what it was
    tuned to find.
    """
    union = _UnionFind(len(signatures))
    for first, second in sorted(candidate_pairs(signatures, bands, rows, offset_bands)):
        if union.find(first) != union.find(second) and \
                jaccard_of_sorted(shingle_sets[first], shingle_sets[second]) >= min_jaccard:
            union.union(first, second)
    return np.array([union.find(i) for i in range(len(signatures))])


def deduplicate(texts: list[str], exact: bool = True, near: bool = True, num_perm: int = 112, bands: int = 14,
                rows: int = 8, shingle_words: int = 5, min_jaccard: float = 0.65, offset_bands: bool = True,
                examples: int = 3) -> tuple[list[int], dict]:
    """Indices of the documents to keep, and a report: counts, a few example pairs, and `removed_by`
    (removed index → (kept index, "exact" | "near")) for callers that attribute removals to sources."""
    report: dict = {"exact_duplicates": 0, "near_duplicates": 0, "examples": [], "removed_by": {}}
    keep = list(range(len(texts)))
    if exact:
        seen: dict[bytes, int] = {}
        unique = []
        for index in keep:
            key = exact_key(texts[index])
            if key in seen:
                report["exact_duplicates"] += 1
                report["removed_by"][index] = (seen[key], "exact")
                if len(report["examples"]) < examples:
                    report["examples"].append({"kind": "exact", "kept": texts[seen[key]][:200], "removed": texts[index][:200]})
            else:
                seen[key] = index
                unique.append(index)
        keep = unique
    if near and len(keep) > 1:
        hasher = MinHasher(num_perm=num_perm, shingle_words=shingle_words)
        shingle_sets = [hasher.shingles(texts[i]) for i in keep]
        signatures = hasher.signatures_of(shingle_sets)
        representative = near_duplicate_clusters(signatures, shingle_sets, bands, rows, min_jaccard, offset_bands)
        survivors = []
        for position, index in enumerate(keep):
            if representative[position] == position:
                survivors.append(index)
            else:
                report["near_duplicates"] += 1
                report["removed_by"][index] = (keep[representative[position]], "near")
                if sum(e["kind"] == "near" for e in report["examples"]) < examples:
                    kept_text = texts[keep[representative[position]]]
                    report["examples"].append({"kind": "near", "kept": kept_text[:200], "removed": texts[index][:200]})
        keep = survivors
    return keep, report
