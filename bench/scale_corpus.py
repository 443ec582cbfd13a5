"""A scale corpus for the data stage, built from the data kit (../shared/data), with near-duplicates at known places.

    python bench/scale_corpus.py --size-gb 0.02 --out /tmp/scale      # builds /tmp/scale/corpus-0.02gb-seed0/

What it writes (`<out>/corpus-<size>gb-seed<seed>/`):

* `sources/<source>/part_NNNNN.jsonl[.gz]`: six local sources (web, books, textbooks, code, math, multilingual),
  each split into many files (≥ 4, about size/48 bytes each, at most 64 MB) so a stage can work file by file;
  with `--compression mixed` (the default) every other source is gzip-compressed. One JSON object per line:
  `{"text": str, "id": str}`.
* `corpus.yaml`: a Genesis corpus config naming those files (absolute paths), one source per folder.
* `planted.jsonl`: the ground truth, one line per planted pair: `{"copy_id", "original_id", "group", "recipe",
  "jaccard", "cross_source", "cross_file"}` (`jaccard`: the exact Jaccard of the two documents' lower-cased
  5-word shingle sets, the Genesis/datasketch shingling).
* `index.parquet`: every document: `id`, `source`, `file`, `line`, `key` (16-byte blake2b of the text with
  Unicode NFC, control characters removed and whitespace runs collapsed: see `text_key`), `bytes`, `group`
  (-1 unless part of a planted pair), `role` (0 plain, 1 original, 2 copy).
* `build.json`: the parameters, counts and bytes; written last, so its presence means the build finished (a
  rebuild with the same parameters is skipped).

How documents are made. Each source has a pool: the kit's files of that kind, normalised (NFC, CRLF → LF,
control characters removed) and joined into one string. A document is 3–5 windows cut from random places of
its source's pool (aligned to line or word boundaries), its length drawn log-uniformly from the source's range;
so documents are new combinations of real text and unrelated documents share almost no 5-gram shingles, even
when the pool is reused a hundred times at 4 GB. Every document is generated from its own seeded RNG
(seed, source, file, index), so a file can be written by any process and a copy can regenerate its original.
Documents are checked against Genesis's default clean rules (≥ 200 characters, ≤ 40% repeated lines), so the
clean stage removes nothing: a document that goes missing was removed by dedup.

Planting. A fraction (`--plant-fraction`, default 5%) of the documents are originals; each gets one edited copy,
placed in another source (45%), another file of the same source (45%) or elsewhere in the same file (10%), at a
random position. Recipes (drawn per copy):

* `exact_norm` (15%): ASCII words re-cased and some spaces doubled: equal to the original after lower-casing and
  whitespace collapsing (Genesis's exact-dedup key), still a distinct text;
* `subst_1pct` (25%), `subst_3pct` (25%): 1% / 3% of the words replaced by common English words;
* `structural` (35%): 5% of the sentences deleted, ~3% of adjacent sentence pairs swapped, 10% of the sentences
  re-cased, a boilerplate footer (and, half the time, a header) added.

The same edit functions (`edit_subst`, `edit_structural`) are the planting recipes of bench/data.py.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import math
import multiprocessing
import os
import random
import re
import sys
import time
import unicodedata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
KIT = REPO.parent / "shared" / "data"

# name → (kit files under pretrain/ without .jsonl.gz, share of the corpus's bytes, document length range in chars)
SOURCES: dict[str, tuple[list[str], float, tuple[int, int]]] = {
    "web": (["c4_web_sample", "wikipedia_sample", "wikitext2.test", "wikitext2.valid"], 0.20, (600, 12_000)),
    "books": (["gutenberg_books", "tinyshakespeare"], 0.22, (2_000, 30_000)),
    "textbooks": (["openstax_textbooks"], 0.20, (1_500, 25_000)),
    "code": (["code_python"], 0.12, (500, 12_000)),
    "math": (["gsm8k.train", "gsm8k.test", "math500.test"], 0.10, (400, 3_000)),
    "multilingual": (["multilingual_bible_nt", "multilingual_ud.dev", "multilingual_ud.test", "multilingual_xquad"],
                     0.16, (300, 10_000)),
}
RECIPES = (("exact_norm", 0.15), ("subst_1pct", 0.25), ("subst_3pct", 0.25), ("structural", 0.35))
BUILD_VERSION = 1

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_SPACES = re.compile(r"\s+")
_ASCII_WORD = re.compile(r"\b[A-Za-z]+\b")

# Common English words (substitutions), and boilerplate of the kind web pages carry.
_VOCAB = ("the of and to in is was for on that with as by at from this be are or an it which have not has his "
          "they you their one all were but more can also been new would there first other some when time what "
          "after may only two over into most these her about such than its them many people then year used "
          "where between both under while same during each made well system part through city state world "
          "number water house because small large general public called later around being known early three").split()
_HEADERS = (
    "Skip to main content. Menu. Home | About | Contact | Subscribe to our newsletter for weekly updates.",
    "This page uses cookies to improve your experience. By continuing to browse you accept our cookie policy.",
    "Advertisement. Continue reading below. Sign in or create a free account to save articles for later.",
    "You are here: Home > Articles > Archive {n}. Print this page. Share on Facebook, Twitter, LinkedIn, Email.",
)
_FOOTERS = (
    "Copyright (c) 20{n} All rights reserved. Terms of use | Privacy policy | Cookie settings | Contact us.",
    "Share this: Facebook Twitter Reddit Email Print. Like this: Like Loading... Related posts from the archive.",
    "Posted in Uncategorized. Tagged reading, notes, archive {n}. Leave a comment. Previous post | Next post.",
    "Was this article helpful? Yes / No. {n} people found this useful. Report an issue with this page here.",
    "Subscribe to get the latest posts sent to your email. Type your email address. Subscribe. Powered by CMS {n}.",
)


# ------------------------------------------------------------------------------------------------------------
# Text helpers shared with the benches


def normalise(text: str) -> str:
    """NFC, CRLF → LF, C0/C1 controls (except tab/newline/CR) removed, stripped: the form Genesis's clean stage
    leaves documents in, so a generated text comes out of the stage unchanged."""
    return _CONTROL.sub("", unicodedata.normalize("NFC", text).replace("\r\n", "\n")).strip()


def text_key(text: str) -> bytes:
    """How the benches recognise a document after a stage: blake2b-128 of the normalised text with whitespace
    runs collapsed (so a stage that trims or re-joins whitespace does not hide a survivor). Case is kept, so a
    re-cased copy keeps its own key."""
    return hashlib.blake2b(_SPACES.sub(" ", normalise(text)).encode("utf-8"), digest_size=16).digest()


def shingle_set(text: str, n: int = 5) -> set[str]:
    """Lower-cased whitespace-word n-grams (Genesis's and datasketch's shingling; datatrove is configured to match)."""
    words = text.lower().split()
    if len(words) < n:
        return {" ".join(words)}
    return {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}


def jaccard(a: str, b: str) -> float:
    x, y = shingle_set(a), shingle_set(b)
    return len(x & y) / max(1, len(x | y))


def repeated_line_fraction(text: str) -> float:
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    if len(lines) < 4:
        return 0.0
    counts: dict[str, int] = {}
    for line in lines:
        counts[line] = counts.get(line, 0) + 1
    return sum(c for c in counts.values() if c > 1) / len(lines)


# ------------------------------------------------------------------------------------------------------------
# Edit recipes (deterministic given the rng)


def edit_subst(text: str, rng: random.Random, fraction: float) -> str:
    """Replace `fraction` of the words with common English words (whitespace kept as it was)."""
    parts = re.split(r"(\s+)", text)
    words = [j for j in range(0, len(parts), 2) if parts[j]]
    changed = False
    for j in words:
        if rng.random() < fraction:
            new = rng.choice(_VOCAB)
            changed |= new != parts[j]
            parts[j] = new
    if not changed and words:  # a short text: at least one word changes
        j = rng.choice(words)
        parts[j] = rng.choice([w for w in _VOCAB if w != parts[j]])
    return "".join(parts)


def _recase(sentence: str, rng: random.Random) -> str:
    mode = rng.random()
    if mode < 0.4:
        return _ASCII_WORD.sub(lambda m: m.group(0).upper(), sentence)
    if mode < 0.8:
        return _ASCII_WORD.sub(lambda m: m.group(0).lower(), sentence)
    return _ASCII_WORD.sub(lambda m: m.group(0).capitalize(), sentence)


def edit_structural(text: str, rng: random.Random, delete: float = 0.05, swap: float = 0.03,
                    recase: float = 0.10) -> str:
    """Delete sentences, swap adjacent ones, re-case some (ASCII letters), add boilerplate around the text."""
    pieces = re.split(r"((?<=[.!?])[ \t]+|\n+)", text)
    units = [[pieces[j], pieces[j + 1] if j + 1 < len(pieces) else ""] for j in range(0, len(pieces), 2)]
    kept = [u for u in units if rng.random() >= delete] or units[:1]
    for _ in range(max(1, round(swap * len(kept)))):
        if len(kept) < 2:
            break
        j = rng.randrange(len(kept) - 1)
        kept[j][0], kept[j + 1][0] = kept[j + 1][0], kept[j][0]
    body = "".join((_recase(s, rng) if rng.random() < recase else s) + sep for s, sep in kept).strip()
    n = rng.randrange(10, 99)
    footer = rng.choice(_FOOTERS).format(n=n)
    if rng.random() < 0.5:
        return rng.choice(_HEADERS).format(n=n) + "\n\n" + body + "\n\n" + footer
    return body + "\n\n" + footer


def edit_exact_norm(text: str, rng: random.Random) -> str:
    """Re-case ASCII words and double some spaces: Genesis's exact key (lower-cased, whitespace collapsed) is
    unchanged, the text is not. Returns the text unchanged when it has nothing to re-case."""
    out = _ASCII_WORD.sub(lambda m: m.group(0).upper() if rng.random() < 0.3 else m.group(0), text)
    return re.sub(r" ", lambda m: "  " if rng.random() < 0.05 else " ", out)


def apply_recipe(recipe: str, text: str, rng: random.Random) -> str:
    if recipe == "exact_norm":
        return edit_exact_norm(text, rng)
    if recipe == "subst_1pct":
        return edit_subst(text, rng, 0.01)
    if recipe == "subst_3pct":
        return edit_subst(text, rng, 0.03)
    if recipe == "structural":
        return edit_structural(text, rng)
    raise ValueError(recipe)


# ------------------------------------------------------------------------------------------------------------
# Document generation

_POOLS: dict[str, str] = {}


def load_pools() -> dict[str, str]:
    if not _POOLS:
        for name, (files, _, _) in SOURCES.items():
            texts = []
            for stem in files:
                with gzip.open(KIT / "pretrain" / f"{stem}.jsonl.gz", "rt", encoding="utf-8") as handle:
                    texts += [normalise(json.loads(line)["text"]) for line in handle]
            _POOLS[name] = "\n\n".join(t for t in texts if t)
    return _POOLS


def _window(pool: str, rng: random.Random, length: int) -> str:
    length = max(50, min(length, len(pool) // 4))
    start = rng.randrange(0, len(pool) - length)
    newline = pool.find("\n", start, start + 300)
    if newline != -1:
        start = newline + 1
    else:
        space = pool.find(" ", start, start + 100)
        start = space + 1 if space != -1 else start
    end = start + length
    newline = pool.find("\n", end, end + 300)
    if newline != -1:
        end = newline
    else:
        space = pool.find(" ", end, end + 100)
        end = space if space != -1 else end
    return pool[start:end].strip()


def generate(seed: int, source: str, file: int, index: int) -> str:
    """Document `index` of file `file` of `source`: 3–5 windows of the source's pool, length log-uniform in the
    source's range; redrawn until it passes the clean rules."""
    pool = load_pools()[source]
    low, high = SOURCES[source][2]
    rng = random.Random(f"{seed}|{source}|{file}|{index}")
    while True:
        target = math.exp(rng.uniform(math.log(low), math.log(high)))
        k = rng.randint(3, 5)
        text = "\n\n".join(w for w in (_window(pool, rng, int(target / k * rng.uniform(0.7, 1.3))) for _ in range(k)) if w)
        if len(text) >= 200 and repeated_line_fraction(text) <= 0.4:
            return text


# ------------------------------------------------------------------------------------------------------------
# Building


def _open_out(path: Path, gz: bool):
    if gz:
        raw = open(path, "wb")
        return io.TextIOWrapper(gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1, mtime=0), encoding="utf-8"), raw
    return open(path, "w", encoding="utf-8"), None


def _build_file(job: dict) -> dict:
    """Write one file: its own documents in order, with the copies planted into it inserted at their positions.
    Returns its index rows and its planted pairs."""
    seed, source, file, n_docs = job["seed"], job["source"], job["file"], job["n_docs"]
    originals: dict[int, int] = job["originals"]
    copies = sorted(job["copies"], key=lambda c: (c["position"], c["group"]))
    rows = {"id": [], "source": [], "file": [], "line": [], "key": [], "bytes": [], "group": [], "role": []}
    pairs = []
    path = Path(job["path"])
    tmp = path.with_name(path.name + ".tmp")
    handle, raw = _open_out(tmp, path.name.endswith(".gz"))
    line = 0
    next_copy = 0

    def emit(doc_id: str, text: str, group: int, role: int) -> None:
        nonlocal line
        handle.write(json.dumps({"text": text, "id": doc_id}, ensure_ascii=False) + "\n")
        for column, value in (("id", doc_id), ("source", source), ("file", file), ("line", line),
                              ("key", text_key(text)), ("bytes", len(text.encode("utf-8"))), ("group", group),
                              ("role", role)):
            rows[column].append(value)
        line += 1

    try:
        for index in range(n_docs + 1):
            while next_copy < len(copies) and copies[next_copy]["position"] <= index:
                copy = copies[next_copy]
                next_copy += 1
                original = generate(seed, copy["orig_source"], copy["orig_file"], copy["orig_index"])
                rng = random.Random(f"{seed}|copy|{copy['group']}")
                recipe = copy["recipe"]
                text = normalise(apply_recipe(recipe, original, rng))
                if text_key(text) == text_key(original):
                    recipe = "subst_1pct"  # nothing to re-case (e.g. a text without ASCII letters)
                    text = normalise(apply_recipe(recipe, original, rng))
                copy_id = f"{source}-{file:05d}-c{copy['group']:07d}"
                emit(copy_id, text, copy["group"], 2)
                pairs.append({"copy_id": copy_id, "original_id": copy["orig_id"], "group": copy["group"],
                              "recipe": recipe, "jaccard": round(jaccard(original, text), 4),
                              "cross_source": copy["orig_source"] != source,
                              "cross_file": (copy["orig_source"], copy["orig_file"]) != (source, file)})
            if index == n_docs:
                break
            group = originals.get(index, -1)
            emit(f"{source}-{file:05d}-{index:07d}", generate(seed, source, file, index), group, 1 if group >= 0 else 0)
    finally:
        handle.close()
        if raw is not None:
            raw.close()
    os.replace(tmp, path)
    return {"rows": rows, "pairs": pairs, "path": str(path)}


def corpus_dir(out: Path, size_gb: float, seed: int, file_mb: float | None = None) -> Path:
    return Path(out) / f"corpus-{size_gb:g}gb-seed{seed}{f'-{file_mb:g}mb' if file_mb else ''}"


def _mean_doc_bytes(seed: int, source: str, samples: int = 200) -> float:
    return sum(len(generate(seed + 10_000, source, -1, i).encode("utf-8")) for i in range(samples)) / samples


def build(size_gb: float, out: Path, seed: int = 0, plant_fraction: float = 0.05, compression: str = "mixed",
          processes: int | None = None, log=print, file_mb: float | None = None) -> Path:
    """Build (or reuse) the corpus of about `size_gb` × 10⁹ bytes of text; returns its directory. `file_mb`: the
    size of every file, whatever the corpus size (a hub dataset's shards are one size however many there are);
    unset, files are about size/48 (at least 256 kB, at most 64 MB)."""
    root = corpus_dir(out, size_gb, seed, file_mb)
    params = {"version": BUILD_VERSION, "size_gb": size_gb, "seed": seed, "plant_fraction": plant_fraction,
              "compression": compression, "sources": {k: [v[0], v[1], list(v[2])] for k, v in SOURCES.items()},
              "recipes": RECIPES, **({"file_mb": file_mb} if file_mb else {})}
    params = json.loads(json.dumps(params))  # as build.json holds it (tuples → lists)
    done = root / "build.json"
    if done.is_file() and json.loads(done.read_text()).get("params") == params:
        log(f"scale corpus: reusing {root}")
        return root
    started = time.perf_counter()
    load_pools()
    total = size_gb * 1e9 / (1 + plant_fraction)
    file_bytes = file_mb * 1e6 if file_mb else min(64e6, max(256e3, size_gb * 1e9 / 48))
    layout = {}
    for position, (name, (_, share, _)) in enumerate(SOURCES.items()):
        files = max(4, round(total * share / file_bytes))
        per_file = max(1, round(total * share / files / _mean_doc_bytes(seed, name)))
        gz = compression == "gzip" or (compression == "mixed" and position % 2 == 0)
        layout[name] = {"files": files, "docs_per_file": per_file, "suffix": ".jsonl.gz" if gz else ".jsonl"}

    # The plan: which documents are originals, where each copy goes, with which recipe.
    rng = random.Random(f"{seed}|plan")
    names = list(SOURCES)
    recipes, weights = zip(*RECIPES)
    originals: dict[tuple[str, int], dict[int, int]] = {}
    copies: dict[tuple[str, int], list[dict]] = {}
    group = 0
    for name in names:
        for file in range(layout[name]["files"]):
            for index in range(layout[name]["docs_per_file"]):
                if rng.random() >= plant_fraction:
                    continue
                u = rng.random()
                if u < 0.45:
                    dest = rng.choice([n for n in names if n != name])
                    dest_file = rng.randrange(layout[dest]["files"])
                elif u < 0.9:
                    dest = name
                    dest_file = rng.choice([f for f in range(layout[name]["files"]) if f != file])
                else:
                    dest, dest_file = name, file
                originals.setdefault((name, file), {})[index] = group
                copies.setdefault((dest, dest_file), []).append({
                    "group": group, "orig_source": name, "orig_file": file, "orig_index": index,
                    "orig_id": f"{name}-{file:05d}-{index:07d}", "recipe": rng.choices(recipes, weights)[0],
                    "position": rng.randint(0, layout[dest]["docs_per_file"])})
                group += 1
    jobs = []
    for name in names:
        (root / "sources" / name).mkdir(parents=True, exist_ok=True)
        for file in range(layout[name]["files"]):
            jobs.append({"seed": seed, "source": name, "file": file, "n_docs": layout[name]["docs_per_file"],
                         "originals": originals.get((name, file), {}), "copies": copies.get((name, file), []),
                         "path": str(root / "sources" / name / f"part_{file:05d}{layout[name]['suffix']}")})
    done.unlink(missing_ok=True)
    processes = processes or min(os.cpu_count() or 1, 16)
    log(f"scale corpus: building {root} ({size_gb:g} GB, {len(jobs)} files, {group} planted pairs, "
        f"{processes} processes)")
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables, pairs = [], []
    context = multiprocessing.get_context("fork")  # the kit's pools are shared copy-on-write
    with context.Pool(processes) as pool:
        for finished, result in enumerate(pool.imap_unordered(_build_file, jobs), start=1):
            rows = result["rows"]
            tables.append(pa.table({**{k: rows[k] for k in ("id", "source", "file", "line", "bytes", "group", "role")},
                                    "key": pa.array(rows["key"], type=pa.binary(16))}))
            pairs += result["pairs"]
            if finished % max(1, len(jobs) // 10) == 0:
                log(f"  {finished}/{len(jobs)} files")
    index = pa.concat_tables(tables).sort_by([("source", "ascending"), ("file", "ascending"), ("line", "ascending")])
    pq.write_table(index, root / "index.parquet")
    pairs.sort(key=lambda p: p["group"])
    with open(root / "planted.jsonl", "w", encoding="utf-8") as handle:
        for pair in pairs:
            handle.write(json.dumps(pair) + "\n")
    keys = index.column("key").to_pylist()
    duplicate_keys = len(keys) - len(set(keys))
    (root / "corpus.yaml").write_text(corpus_yaml(root, size_gb, layout))
    by_recipe: dict[str, int] = {}
    for pair in pairs:
        by_recipe[pair["recipe"]] = by_recipe.get(pair["recipe"], 0) + 1
    info = {"params": params, "docs": index.num_rows, "text_bytes": int(sum(index.column("bytes").to_pylist())),
            "file_bytes": sum(p.stat().st_size for p in (root / "sources").rglob("part_*")),
            "files": len(jobs), "planted_pairs": len(pairs), "pairs_by_recipe": by_recipe,
            "duplicate_keys": duplicate_keys, "layout": layout, "build_s": round(time.perf_counter() - started, 1)}
    done.write_text(json.dumps(info, indent=1))
    log(f"scale corpus: {info['docs']:,} docs, {info['text_bytes'] / 1e9:.3f} GB of text, {len(pairs):,} planted pairs "
        f"{by_recipe}, {duplicate_keys} duplicate keys, {info['build_s']} s")
    return root


def corpus_yaml(root: Path, size_gb: float, layout: dict) -> str:
    lines = [f"# Built by bench/scale_corpus.py: the data kit re-mixed, {size_gb:g} GB, with planted near-duplicates "
             f"(planted.jsonl).", f"name: scale-{size_gb:g}gb", "sources:"]
    for name, (_, share, _) in SOURCES.items():
        pattern = str(root / "sources" / name / f"part_*{layout[name]['suffix']}")
        lines.append(f"  - {{name: {name}, kind: local, paths: [{json.dumps(pattern)}], weight: {share}, "
                     f"license: \"data kit remix (see ../shared/data/README.md)\"}}")
    lines += ["tokenizer:", "  vocab_size: 49152", "  sample_sentences: 200000", "docs_per_shard: 10000",
              "workers: 2", ""]
    return "\n".join(lines)


def read_info(root: Path) -> dict:
    return json.loads((Path(root) / "build.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, nargs="+", default=[0.25, 1, 4])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plant-fraction", type=float, default=0.05)
    parser.add_argument("--compression", choices=("mixed", "gzip", "none"), default="mixed")
    parser.add_argument("--processes", type=int, default=None)
    parser.add_argument("--file-mb", type=float, default=None, help="every file this size (default: about size/48)")
    args = parser.parse_args()
    for size in args.size_gb:
        build(size, args.out, args.seed, args.plant_fraction, args.compression, args.processes, file_mb=args.file_mb)


if __name__ == "__main__":
    sys.exit(main())
