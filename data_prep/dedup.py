"""Exact and near-duplicate removal.

Exact: documents whose normalised form (lower-cased, whitespace collapsed) hashes equal; the first is kept.

Near: MinHash over word 5-gram shingles with 112 permutations and LSH with 14 bands × 8 rows (datatrove's
defaults; the S-curve's threshold sits near Jaccard 0.72). Documents sharing any band bucket are linked,
clusters are the connected components, and each cluster keeps its first document.

Speed: signatures are computed for many documents at once. Shingle hashes of a whole batch are one uint64
vector; each permutation is a multiply-shift hash ((a·x + b) mod 2^64) >> 32 with random odd a, applied to the
whole vector, and `np.minimum.reduceat` takes every document's minimum in one pass. No Python loop runs per
shingle or per document inside the permutations.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from dataclasses import dataclass, field

import numpy as np

# Words are whitespace-separated tokens, lower-cased (datasketch's and datatrove's usual shingling).
_WORD = re.compile(r"\S+")
_SPACE = re.compile(r"\s+")


def exact_key(text: str) -> bytes:
    return hashlib.blake2b(_SPACE.sub(" ", text.lower()).strip().encode("utf-8"), digest_size=16).digest()


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

    def shingles(self, text: str) -> np.ndarray:
        """Distinct 64-bit hashes of the document's lower-cased word n-grams."""
        words = _WORD.findall(text.lower())
        if not words:
            return np.zeros(1, dtype=np.uint64)
        word_hashes = np.fromiter((zlib.crc32(w.encode("utf-8")) for w in words), dtype=np.uint64, count=len(words))
        n = self.shingle_words
        if len(words) < n:
            n = len(words)
        # Polynomial combination of n consecutive 32-bit word hashes, vectorised over positions.
        combined = np.zeros(len(words) - n + 1, dtype=np.uint64)
        for offset in range(n):
            combined = combined * np.uint64(1_000_003) + word_hashes[offset : len(words) - n + 1 + offset]
        return np.unique(combined)

    def signatures(self, texts: list[str]) -> np.ndarray:
        """(len(texts), num_perm) uint32 MinHash signatures."""
        shingle_sets = [self.shingles(text) for text in texts]
        lengths = np.array([len(s) for s in shingle_sets])
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        flat = np.concatenate(shingle_sets)
        out = np.empty((len(texts), self.num_perm), dtype=np.uint32)
        shift = np.uint64(32)
        with np.errstate(over="ignore"):  # wrap-around modulo 2^64 is the hash
            for perm in range(self.num_perm):
                hashed = (flat * self.a[perm] + self.b[perm]) >> shift
                out[:, perm] = np.minimum.reduceat(hashed, starts)
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


def near_duplicate_clusters(signatures: np.ndarray, bands: int, rows: int, min_similarity: float = 0.6) -> np.ndarray:
    """Representative (first member's index) of each document's cluster.

    LSH proposes pairs that share one band; a pair is linked only if its whole signatures agree on at least
    `min_similarity` of the permutations (an estimate of their Jaccard similarity, ±0.05 at 112 permutations),
    which drops accidental band collisions and keeps chains from joining dissimilar documents.
    """
    n = len(signatures)
    if bands * rows > signatures.shape[1]:
        raise ValueError(f"bands × rows = {bands * rows} exceeds the {signatures.shape[1]} permutations")
    union = _UnionFind(n)
    for band in range(bands):
        block = np.ascontiguousarray(signatures[:, band * rows : (band + 1) * rows])
        keys = block.view(np.dtype((np.void, block.dtype.itemsize * rows))).ravel()
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        same_as_previous = np.nonzero(sorted_keys[1:] == sorted_keys[:-1])[0]
        for position in same_as_previous:
            first, second = int(order[position]), int(order[position + 1])
            if np.mean(signatures[first] == signatures[second]) >= min_similarity:
                union.union(first, second)
    return np.array([union.find(i) for i in range(n)])


def deduplicate(texts: list[str], exact: bool = True, near: bool = True, num_perm: int = 112, bands: int = 14,
                rows: int = 8, shingle_words: int = 5, examples: int = 3) -> tuple[list[int], dict]:
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
        signatures = hasher.signatures([texts[i] for i in keep])
        representative = near_duplicate_clusters(signatures, bands, rows)
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
