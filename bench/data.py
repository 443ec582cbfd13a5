"""Data-stage speed on the data kit (../shared/data), all in one run on this machine:

* raw SentencePiece encode throughput per process vs tokenize-to-shards on 1 and 2 processes;
* near-dedup documents/s per core against datasketch's MinHash + MinHashLSH with the same parameters (5-word
  shingles, 112 permutations, 14 bands × 8 rows), and both methods' recall / precision on planted near-duplicates
  (copies with 3% of words edited);
* tokenizer training time for a 49,152 vocab from a 200k-sentence sample.

    python bench/data.py --out bench/results/data.json
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import environment, write_json  # noqa: E402
from data_prep.dedup import MinHasher, near_duplicate_clusters  # noqa: E402
from data_prep.shards import tokenize_parts, write_text_part  # noqa: E402
from data_prep.tokenizer import train_sentencepiece  # noqa: E402

DATA = REPO.parent / "shared" / "data"


def kit_documents() -> list[str]:
    texts = []
    for path in sorted((DATA / "pretrain").glob("*.jsonl.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            texts += [json.loads(line)["text"] for line in handle]
    return texts


def planted(documents: list[str], count: int, edit_fraction: float, seed: int = 0) -> tuple[list[str], set[int]]:
    """Append `count` edited copies of long documents; returns the corpus and the indices of the copies."""
    rng = random.Random(seed)
    sources = [d for d in documents if len(d.split()) >= 100]
    corpus = list(documents)
    copies = set()
    for doc in rng.sample(sources, count):
        words = doc.split()
        corpus.append(" ".join("edited" if rng.random() < edit_fraction else w for w in words))
        copies.add(len(corpus) - 1)
    return corpus, copies


def shingle_set(text: str) -> set[str]:
    words = text.lower().split()
    return {" ".join(words[i:i + 5]) for i in range(max(1, len(words) - 4))}


def jaccard(a: str, b: str) -> float:
    x, y = shingle_set(a), shingle_set(b)
    return len(x & y) / max(1, len(x | y))


def score(corpus: list[str], removed: dict[int, list[int]], copies: set[int]) -> tuple[float, float]:
    """Recall on the planted copies; precision counting a removal as right when it is a planted copy or its
    exact 5-gram Jaccard with a document it was matched to is ≥ 0.7 (a real near-duplicate of the kit)."""
    recall = len(set(removed) & copies) / len(copies)
    right = sum(1 for i, matches in removed.items()
                if i in copies or max((jaccard(corpus[i], corpus[j]) for j in matches), default=0) >= 0.7)
    return recall, (right / len(removed) if removed else 1.0)


def datasketch_dedup(texts: list[str]) -> tuple[dict[int, list[int]], float]:
    from datasketch import MinHash, MinHashLSH

    started = time.perf_counter()
    lsh = MinHashLSH(num_perm=112, params=(14, 8))
    removed: dict[int, list[int]] = {}
    for index, text in enumerate(texts):
        signature = MinHash(num_perm=112, seed=1)
        signature.update_batch([s.encode("utf-8") for s in shingle_set(text)])
        matches = lsh.query(signature)
        if matches:
            removed[index] = [int(m) for m in matches]
        else:
            lsh.insert(str(index), signature)
    return removed, time.perf_counter() - started


def genesis_dedup(texts: list[str], offset_bands: bool = True) -> tuple[dict[int, list[int]], float]:
    """The stage's near-dedup (`offset_bands=False`: the 14 aligned bands alone, still verified)."""
    started = time.perf_counter()
    hasher = MinHasher()
    shingle_sets = [hasher.shingles(text) for text in texts]
    signatures = hasher.signatures_of(shingle_sets)
    representative = near_duplicate_clusters(signatures, shingle_sets, 14, 8, offset_bands=offset_bands)
    seconds = time.perf_counter() - started
    return {i: [int(r)] for i, r in enumerate(representative) if r != i}, seconds


def genesis_aligned_bands_only(texts: list[str]) -> tuple[dict[int, list[int]], float]:
    return genesis_dedup(texts, offset_bands=False)


def recall_over_seeds(seeds: int, out: Path) -> None:
    """Recall and precision of both near-dedup methods over several plantings (one planting's recall has a
    binomial spread of about ±0.014 on 1,000 copies, so one run cannot tell close methods apart)."""
    import statistics

    documents = kit_documents()
    rows = []
    for seed in range(seeds):
        corpus, copies = planted(documents[:6000], 1000, 0.03, seed=seed)
        row = {"seed": seed}
        for name, method in (("datasketch", datasketch_dedup), ("genesis", genesis_dedup),
                             ("genesis_aligned_bands_only", genesis_aligned_bands_only)):
            removed, _ = method(corpus)
            row[f"{name}_recall"], row[f"{name}_precision"] = (round(v, 4) for v in score(corpus, removed, copies))
        rows.append(row)
        print(row, flush=True)
    summary = {key: round(statistics.mean(r[key] for r in rows), 4) for key in rows[0] if key != "seed"}
    write_json(out, {**environment(), "plantings": rows, "mean": summary})
    print(json.dumps(summary, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "data.json")
    parser.add_argument("--recall-seeds", type=int, default=0,
                        help="only compare near-dedup recall over this many plantings (bench/results/dedup_recall.json)")
    args = parser.parse_args()
    if args.recall_seeds:
        recall_over_seeds(args.recall_seeds, REPO / "bench" / "results" / "dedup_recall.json")
        return
    import sentencepiece as spm

    documents = kit_documents()
    total_bytes = sum(len(d.encode("utf-8")) for d in documents)
    results = {**environment(), "machine": environment()["machine"], "documents": len(documents), "bytes": total_bytes}
    work = Path(tempfile.mkdtemp(prefix="genesis-bench-"))
    try:
        # Tokenizer training: 49,152 vocab from a 200k-sentence sample.
        rng = random.Random(0)
        lines = [line for doc in documents for line in doc.split("\n") if line.strip()]
        sample = rng.sample(lines, min(200_000, len(lines)))
        started = time.perf_counter()
        train_sentencepiece(sample, work / "tokenizer", vocab_size=49_152, threads=2)
        results["tokenizer_train_s"] = round(time.perf_counter() - started, 2)
        model = work / "tokenizer" / "tokenizer.model"
        print("tokenizer", results["tokenizer_train_s"], flush=True)

        # Raw encode throughput, one process.
        sp = spm.SentencePieceProcessor(model_file=str(model))
        started = time.perf_counter()
        for start in range(0, len(documents), 512):
            sp.encode(documents[start:start + 512], num_threads=1)
        results["spm_encode_mb_s"] = round(total_bytes / 1e6 / (time.perf_counter() - started), 2)
        print("spm", results["spm_encode_mb_s"], flush=True)

        # Tokenize to shards: the stage's own code, 1 and 2 processes, 16 parts.
        parts = 16
        for index in range(parts):
            write_text_part(work / "data" / "clean" / "kit" / f"part_{index:05d}.arrow", documents[index::parts])
        for workers in (1, 2):
            shutil.rmtree(work / "data" / "kit", ignore_errors=True)
            started = time.perf_counter()
            tokenize_parts(work / "data", model, workers=workers)
            results[f"shards_mb_s_{workers}proc"] = round(total_bytes / 1e6 / (time.perf_counter() - started), 2)
            print("shards", workers, results[f"shards_mb_s_{workers}proc"], flush=True)

        # Near-dedup against datasketch on planted near-duplicates.
        corpus, copies = planted(documents[:6000], 1000, 0.03)
        removed_ds, seconds_ds = datasketch_dedup(corpus)
        removed_ours, seconds_ours = genesis_dedup(corpus)
        results["datasketch_docs_s"] = round(len(corpus) / seconds_ds, 1)
        results["dedup_docs_s"] = round(len(corpus) / seconds_ours, 1)
        results["dedup_recall"], results["dedup_precision"] = (round(v, 4) for v in score(corpus, removed_ours, copies))
        results["datasketch_recall"], results["datasketch_precision"] = (round(v, 4) for v in score(corpus, removed_ds, copies))
        removed_aligned, _ = genesis_aligned_bands_only(corpus)
        results["dedup_recall_aligned_bands_only"], results["dedup_precision_aligned_bands_only"] = (
            round(v, 4) for v in score(corpus, removed_aligned, copies))
        results["dedup_note"] = ("6,000 kit documents + 1,000 planted copies with 3% of words edited; one process; "
                                 "precision counts a removal right if planted or exact 5-gram Jaccard ≥ 0.7 with its match; "
                                 "Genesis probes the 14 aligned bands plus 13 offset ones and verifies each candidate pair "
                                 "by exact Jaccard ≥ 0.65")
        write_json(args.out, results)
        print(json.dumps(results, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
