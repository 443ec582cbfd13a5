"""Data-stage speed on the data kit (../shared/data), all in one run on this machine:

* near-dedup, like with like: Genesis's `data_prep.dedup.deduplicate` against datasketch set up as its
  documentation recommends and against datatrove's MinHash dedup, all with the same shingles (lower-cased
  whitespace words, 5-grams), 112 hashes in 14 bands × 8 rows; recall, precision and time per method on each
  planting recipe (below);
* tokenizer training time for a 49,152 vocab from a 200k-sentence sample, and raw SentencePiece encode speed
  (one thread). Tokenize-to-shards against that speed is measured at scale by bench/data_scale.py, on the
  stage's own per-stage timings.

    python bench/data.py                       # everything, appended to bench/results/data.json
    python bench/data.py --dedup-only          # the near-dedup comparison only
    python bench/data.py --recall-seeds 5      # the comparison over 5 plantings (bench/results/dedup_recall.json)

The corpus: --docs kit documents (a seeded sample of all of ../shared/data/pretrain) plus --copies planted
copies of documents of ≥ 100 words, each copy appended after the originals, made by one recipe
(bench/scale_corpus.py's edit functions):

* `subst`: 3% of the words replaced by common English words;
* `structural`: 5% of the sentences deleted, ~3% of adjacent sentence pairs swapped, 10% re-cased, a
  boilerplate footer (and half the time a header) added.

The methods (one process each, same documents, same order):

* `genesis`: `deduplicate(texts)` with the stage's defaults: exact pass, then 112-permutation MinHash, the 14
  aligned bands plus 13 offset ones, candidate pairs verified at exact shingle Jaccard ≥ 0.65;
* `genesis_aligned_bands_only`: the same without the offset bands;
* `datasketch`: `MinHash.generator(..., num_perm=112, hashfunc=xxhash.xxh32_intdigest)` (permutations built once
  and shared by every signature, a fast non-cryptographic hash), `MinHashLSH(num_perm=112, params=(14, 8))`,
  each document queried, then inserted when it matched nothing (keep the first);
* `datatrove`: MinhashDedupSignature → Buckets → Cluster (→ Filter) on LocalPipelineExecutor with one worker,
  in bench/.venv-datatrove (bench/datatrove_run.py: same shingles, 14 × 8, 64-bit xxhash, no verification);
  its time is the three stages that produce the removal list (the filter pass, which re-reads the corpus, is
  recorded apart), measured inside its process.

Scoring: a planted pair is found when either document was removed. A removal is right when a document it was
matched to is its planted partner or has exact 5-gram Jaccard ≥ 0.7 with it (the kit holds real
near-duplicates, e.g. TheAlgorithms files in several folders, which every method rightly removes).
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import append_run, environment, git_dirty, git_rev, host_contention  # noqa: E402
from bench.scale_corpus import edit_structural, edit_subst, jaccard, shingle_set  # noqa: E402

DATA = REPO.parent / "shared" / "data"
DATATROVE_PYTHON = REPO / "bench" / ".venv-datatrove" / "bin" / "python"
RECIPES = ("subst", "structural")
METHODS = ("genesis", "genesis_aligned_bands_only", "datasketch", "datatrove")
NUM_PERM, BANDS, ROWS = 112, 14, 8


def kit_documents() -> list[str]:
    texts = []
    for path in sorted((DATA / "pretrain").glob("*.jsonl.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            texts += [json.loads(line)["text"] for line in handle]
    return texts


def planted(documents: list[str], docs: int, count: int, recipe: str, seed: int = 0) -> tuple[list[str], dict[int, int]]:
    """`docs` sampled kit documents, then `count` edited copies of those with ≥ 100 words; returns the corpus and
    copy index → original index."""
    rng = random.Random(seed)
    corpus = rng.sample(documents, min(docs, len(documents)))
    candidates = [i for i, d in enumerate(corpus) if len(d.split()) >= 100]
    copies: dict[int, int] = {}
    for original in rng.sample(candidates, min(count, len(candidates))):
        text = corpus[original]
        corpus.append(edit_subst(text, rng, 0.03) if recipe == "subst" else edit_structural(text, rng))
        copies[len(corpus) - 1] = original
    return corpus, copies


def score(corpus: list[str], removed: dict[int, list[int]], copies: dict[int, int]) -> tuple[float, float]:
    """Recall on the planted pairs; precision of the removals (see the module's docstring)."""
    partner = {**copies, **{o: c for c, o in copies.items()}}
    found = sum(1 for c, o in copies.items() if c in removed or o in removed)
    right = sum(1 for i, matches in removed.items()
                if partner.get(i) in matches or max((jaccard(corpus[i], corpus[j]) for j in matches), default=0) >= 0.7)
    return found / len(copies), (right / len(removed) if removed else 1.0)


# ------------------------------------------------------------------------------------------------------------
# Methods: each returns (removed index → indices it was matched to, seconds, extra)


def genesis_dedup(texts: list[str], offset_bands: bool = True) -> tuple[dict[int, list[int]], float, dict]:
    from data_prep.dedup import deduplicate

    started = time.perf_counter()
    _, report = deduplicate(texts, num_perm=NUM_PERM, bands=BANDS, rows=ROWS, shingle_words=5,
                            offset_bands=offset_bands)
    seconds = time.perf_counter() - started
    removed = {int(i): [int(kept)] for i, (kept, _kind) in report["removed_by"].items()}
    return removed, seconds, {"exact": report["exact_duplicates"], "near": report["near_duplicates"]}


def genesis_aligned_bands_only(texts: list[str]):
    return genesis_dedup(texts, offset_bands=False)


def datasketch_dedup(texts: list[str]) -> tuple[dict[int, list[int]], float, dict]:
    """datasketch as its documentation recommends for many documents: MinHash.generator shares one set of
    permutations, a fast hash function (xxhash, as in its docs' farmhash/xxhash examples), an LSH index with
    explicit (bands, rows)."""
    import xxhash
    from datasketch import MinHash, MinHashLSH

    started = time.perf_counter()
    lsh = MinHashLSH(num_perm=NUM_PERM, params=(BANDS, ROWS))
    removed: dict[int, list[int]] = {}
    signatures = MinHash.generator(([s.encode("utf-8") for s in shingle_set(t)] for t in texts), num_perm=NUM_PERM, seed=1,
                                   hashfunc=xxhash.xxh32_intdigest)
    for index, signature in enumerate(signatures):
        matches = lsh.query(signature)
        if matches:
            removed[index] = [int(m) for m in matches]
        else:
            lsh.insert(str(index), signature)
    return removed, time.perf_counter() - started, {"hashfunc": "xxhash.xxh32_intdigest", "scheme": "affine32"}


def datatrove_dedup(texts: list[str]) -> tuple[dict[int, list[int]], float, dict]:
    if not DATATROVE_PYTHON.is_file():
        raise FileNotFoundError(f"{DATATROVE_PYTHON}: python3.11 -m venv bench/.venv-datatrove && "
                                f"bench/.venv-datatrove/bin/pip install -r bench/requirements-datatrove.txt")
    work = Path(tempfile.mkdtemp(prefix="genesis-dt-"))
    try:
        (work / "input").mkdir()
        with open(work / "input" / "docs.jsonl", "w", encoding="utf-8") as handle:
            for index, text in enumerate(texts):
                handle.write(json.dumps({"text": text, "id": str(index)}, ensure_ascii=False) + "\n")
        result_path = work / "result.json"
        completed = subprocess.run([str(DATATROVE_PYTHON), str(REPO / "bench" / "datatrove_run.py"), "dedup",
                                    "--input", str(work / "input"), "--work", str(work / "run"),
                                    "--result", str(result_path)], capture_output=True, text=True)
        if completed.returncode != 0:
            raise RuntimeError(f"datatrove_run.py failed:\n{completed.stderr[-3000:]}")
        result = json.loads(result_path.read_text())
        clusters: dict[int, list[dict]] = {}
        for line in open(result["clusters_file"], encoding="utf-8"):
            entry = json.loads(line)
            clusters.setdefault(entry["cluster"], []).append(entry)
        removed: dict[int, list[int]] = {}
        for members in clusters.values():
            kept = [int(m["id"]) for m in members if not m["removed"]]
            for member in members:
                if member["removed"]:
                    removed[int(member["id"])] = kept
        timings = result["timings"]
        seconds = timings["signatures"] + timings["buckets"] + timings["cluster"]
        return removed, seconds, {"timings": timings, "datatrove": result["datatrove"]}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_methods(corpus: list[str], copies: dict[int, int], methods: list[str], repeats: int = 1) -> dict:
    """Each method `repeats` times (the fastest time counts: a shared box only ever slows a run down)."""
    functions = {"genesis": genesis_dedup, "genesis_aligned_bands_only": genesis_aligned_bands_only,
                 "datasketch": datasketch_dedup, "datatrove": datatrove_dedup}
    out = {}
    for name in methods:
        times = []
        for _ in range(max(1, repeats)):
            removed, seconds, extra = functions[name](corpus)
            times.append(seconds)
        seconds = min(times)
        recall, precision = score(corpus, removed, copies)
        out[name] = {"recall": round(recall, 4), "precision": round(precision, 4), "seconds": round(seconds, 3),
                     "seconds_all": [round(t, 3) for t in times], "docs_s": round(len(corpus) / seconds, 1),
                     "removed": len(removed), **extra}
        print(name, json.dumps(out[name]), flush=True)
    if "genesis" in out:
        for other in ("datasketch", "datatrove"):
            if other in out:
                out[f"genesis_vs_{other}_speed"] = round(out["genesis"]["docs_s"] / out[other]["docs_s"], 2)
    return out


def dedup_comparison(args) -> dict:
    documents = kit_documents()
    results = {"docs": args.docs, "copies": args.copies, "host_before": host_contention()}
    for recipe in args.recipes:
        corpus, copies = planted(documents, args.docs, args.copies, recipe, seed=0)
        print(f"recipe {recipe}: {len(corpus)} documents, {len(copies)} planted copies", flush=True)
        mean_j = statistics.mean(jaccard(corpus[c], corpus[o]) for c, o in copies.items())
        results[recipe] = {"mean_planted_jaccard": round(mean_j, 4),
                           **run_methods(corpus, copies, args.methods, args.repeats)}
    results["host_after"] = host_contention()
    return results


def recall_over_seeds(args, out: Path) -> None:
    """Recall and precision of every method over several plantings per recipe (one planting's recall has a
    binomial spread of about ±0.014 on 1,000 copies, so one run cannot tell close methods apart)."""
    documents = kit_documents()
    run = {**environment(), "git_rev": git_rev(), "git_dirty": git_dirty(("data_prep", "bench")),
           "command": " ".join(["python", *sys.argv]), "host_before": host_contention(), "docs": args.docs, "copies": args.copies, "plantings": []}
    for recipe in args.recipes:
        for seed in range(args.recall_seeds):
            corpus, copies = planted(documents, args.docs, args.copies, recipe, seed=seed)
            row = {"recipe": recipe, "seed": seed}
            for name, values in run_methods(corpus, copies, args.methods).items():
                if isinstance(values, dict):
                    row[f"{name}_recall"], row[f"{name}_precision"] = values["recall"], values["precision"]
            run["plantings"].append(row)
    run["host_after"] = host_contention()
    mean = {}
    for recipe in args.recipes:
        rows = [r for r in run["plantings"] if r["recipe"] == recipe]
        mean[recipe] = {k: round(statistics.mean(r[k] for r in rows), 4) for k in rows[0] if k not in ("recipe", "seed")}
    run["mean"] = mean
    append_run(out, run, {"mean": mean, "git_rev": run["git_rev"], "command": run["command"]})
    print(json.dumps(mean, indent=1))


def tokenizer_figures(documents: list[str]) -> dict:
    """SentencePiece BPE training (49,152 vocab, 200k-sentence sample, the stage's training function) and raw
    encode speed with one thread."""
    import sentencepiece as spm

    from data_prep.tokenizer import train_sentencepiece

    out = {}
    work = Path(tempfile.mkdtemp(prefix="genesis-bench-"))
    try:
        rng = random.Random(0)
        lines = [line for doc in documents for line in doc.split("\n") if line.strip()]
        sample = rng.sample(lines, min(200_000, len(lines)))
        started = time.perf_counter()
        train_sentencepiece(sample, work / "tokenizer", vocab_size=49_152, threads=2)
        out["tokenizer_train_s"] = round(time.perf_counter() - started, 2)
        sp = spm.SentencePieceProcessor(model_file=str(work / "tokenizer" / "tokenizer.model"))
        total_bytes = sum(len(d.encode("utf-8")) for d in documents)
        started = time.perf_counter()
        for start in range(0, len(documents), 512):
            sp.encode(documents[start:start + 512], num_threads=1)
        out["spm_encode_mb_s"] = round(total_bytes / 1e6 / (time.perf_counter() - started), 2)
        print("tokenizer", out, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "data.json")
    parser.add_argument("--dedup-only", action="store_true", help="only the near-dedup comparison")
    parser.add_argument("--docs", type=int, default=6000, help="kit documents in the dedup corpus")
    parser.add_argument("--copies", type=int, default=1000, help="planted copies")
    parser.add_argument("--recipes", nargs="+", choices=RECIPES, default=list(RECIPES))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method (the fastest counts)")
    parser.add_argument("--recall-seeds", type=int, default=0,
                        help="only compare recall/precision over this many plantings per recipe "
                             "(appended to bench/results/dedup_recall.json)")
    args = parser.parse_args()
    if args.recall_seeds:
        recall_over_seeds(args, args.out.parent / "dedup_recall.json")
        return
    documents = kit_documents()
    run = {**environment(), "git_rev": git_rev(), "git_dirty": git_dirty(("data_prep", "bench")),
           "command": " ".join(["python", *sys.argv]), "documents": len(documents), "bytes": sum(len(d.encode("utf-8")) for d in documents)}
    if not args.dedup_only:
        run.update(tokenizer_figures(documents))
    run["dedup"] = dedup_comparison(args)
    run["dedup_note"] = (f"{args.docs:,} kit documents (seeded sample) + {args.copies:,} planted copies per recipe; "
                         "one process per method; same shingles (lower-cased whitespace 5-grams), 112 hashes, 14 bands "
                         "× 8 rows; a pair is found when either document was removed; a removal is right when matched "
                         "to its planted partner or at exact 5-gram Jaccard ≥ 0.7")
    latest = {"git_rev": run["git_rev"], "command": run["command"]}
    for key in ("tokenizer_train_s", "spm_encode_mb_s"):
        if key in run:
            latest[key] = run[key]
    for recipe in args.recipes:
        for method in args.methods:
            figures = run["dedup"][recipe][method]
            for field in ("recall", "precision", "docs_s"):
                latest[f"dedup_{recipe}_{method}_{field}"] = figures[field]
        for other in ("datasketch", "datatrove"):
            if f"genesis_vs_{other}_speed" in run["dedup"][recipe]:
                latest[f"dedup_{recipe}_genesis_vs_{other}_speed"] = run["dedup"][recipe][f"genesis_vs_{other}_speed"]
    append_run(args.out, run, latest)
    print(json.dumps(latest, indent=1))


if __name__ == "__main__":
    main()
