"""The data stage end to end: sources → normalise/filter → exact + near dedup → tokenizer → token shards.

    prepare(corpus_config, data_dir) -> Manifest

Each step is a plain function with its output on disk and a stage marker (`.stages/<step>.json`, holding the
hash of the config that produced it). A rerun skips steps whose marker matches, and token shards are
skipped one by one, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
from collections import Counter
from pathlib import Path

from genesis.errors import DataError
from genesis.manifest import MANIFEST_NAME, Manifest, SourceEntry, TokenizerEntry, sha256_file, write_manifest
from data_prep.clean import clean_texts
from data_prep.dedup import deduplicate
from data_prep.shards import dump_report, tokenize_parts, write_text_part
from data_prep.sources import CorpusConfig, iter_texts


def _hash(payload) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


class StageMarkers:
    def __init__(self, data_dir: Path):
        self.dir = data_dir / ".stages"
        self.dir.mkdir(parents=True, exist_ok=True)

    def done(self, name: str, key: str) -> bool:
        marker = self.dir / f"{name}.json"
        return marker.is_file() and json.loads(marker.read_text()).get("key") == key

    def info(self, name: str) -> dict:
        marker = self.dir / f"{name}.json"
        return json.loads(marker.read_text()) if marker.is_file() else {}

    def mark(self, name: str, key: str, **info) -> None:
        tmp = self.dir / f".{name}.json.tmp"
        tmp.write_text(json.dumps({"key": key, **info}, indent=1))
        os.replace(tmp, self.dir / f"{name}.json")

    def clear_from(self, names: list[str]) -> None:
        for name in names:
            (self.dir / f"{name}.json").unlink(missing_ok=True)


def clean_and_dedup(config: CorpusConfig, data_dir: Path) -> dict:
    """Read every source, normalise and filter, deduplicate across sources (earlier sources win), and write
    the survivors as text parts of `docs_per_shard` documents. Returns the per-source report."""
    report: dict = {}
    texts: list[str] = []
    owners: list[int] = []
    for index, source in enumerate(config.sources):
        counts: Counter = Counter()
        read_counts: dict = {}
        kept = clean_texts(iter_texts(source, config.on_bad_record, read_counts), config.clean, counts)
        counts.update(read_counts)
        report[source.name] = dict(counts) | {"license": source.license, "weight": source.weight}
        texts += kept
        owners += [index] * len(kept)
    keep, dedup_report = deduplicate(
        texts, exact=config.clean.exact_dedup, near=config.clean.near_dedup, num_perm=config.clean.num_perm,
        bands=config.clean.bands, rows=config.clean.rows, shingle_words=config.clean.shingle_words,
        min_jaccard=config.clean.near_min_jaccard, offset_bands=config.clean.offset_bands)
    kept_set = set(keep)
    removed_by = dedup_report.pop("removed_by")
    for index, source in enumerate(config.sources):
        mine = [i for i, owner in enumerate(owners) if owner == index]
        survivors = [texts[i] for i in mine if i in kept_set]
        removals = [(i, *removed_by[i]) for i in mine if i in removed_by]
        report[source.name]["exact_duplicates_removed"] = sum(kind == "exact" for _, _, kind in removals)
        report[source.name]["near_duplicates_removed"] = sum(kind == "near" for _, _, kind in removals)
        report[source.name]["duplicate_examples"] = [
            {"kind": kind, "removed": texts[i][:300], "kept": texts[kept][:300],
             "kept_source": config.sources[owners[kept]].name}
            for i, kept, kind in removals[:3]
        ]
        report[source.name]["docs_out"] = len(survivors)
        report[source.name]["bytes_out"] = sum(len(t.encode("utf-8")) for t in survivors)
        folder = data_dir / "clean" / source.name
        shutil.rmtree(folder, ignore_errors=True)
        for part, start in enumerate(range(0, len(survivors), config.docs_per_shard)):
            write_text_part(folder / f"part_{part:05d}.arrow", survivors[start : start + config.docs_per_shard])
    report["_dedup_totals"] = dedup_report
    if not keep:
        raise DataError(f"{config.name}: no document survived filtering and dedup; check the sources and filters")
    return report


def tokenizer_sample(config: CorpusConfig, data_dir: Path) -> list[str]:
    """Lines drawn across sources in proportion to their weights, for tokenizer training."""
    from data_prep.shards import read_text_part

    rng = random.Random(config.seed)
    total_weight = sum(s.weight for s in config.sources)
    sample: list[str] = []
    for source in config.sources:
        lines = []
        for part in sorted((data_dir / "clean" / source.name).glob("part_*.arrow")):
            for text in read_text_part(part):
                lines += [line for line in text.split("\n") if line.strip()]
        want = int(config.tokenizer.sample_sentences * source.weight / total_weight)
        sample += lines if len(lines) <= want else rng.sample(lines, want)
    rng.shuffle(sample)
    return sample


def existing_tokenizer_dir(existing: str | Path) -> Path:
    """The tokenizer directory `tokenizer.existing` names: the directory itself, the dir of a `tokenizer.model`,
    or a data directory's `tokenizer/` (a trunk's data_dir)."""
    path = Path(existing)
    for candidate in (path.parent if path.suffix == ".model" else path, path / "tokenizer"):
        if (candidate / "tokenizer.model").is_file():
            return candidate
    raise DataError(f"{existing}: tokenizer.existing names no tokenizer (no tokenizer.model there or in its "
                    f"tokenizer/); name the trunk's data_dir or its tokenizer directory")


def train_tokenizer(config: CorpusConfig, data_dir: Path) -> tuple[Path, str]:
    """The data dir's tokenizer: `tokenizer.existing` copied in; else the one the data dir holds already (a rerun,
    e.g. with new weights: shards for a trunk must keep its tokenizer, or its resume refuses them); else, or with
    `tokenizer.retrain`, a new one trained on a sample of the corpus. Returns (tokenizer.model, how: 'existing',
    'reused' or 'trained')."""
    from data_prep.tokenizer import SentencePieceTokenizer, train_sentencepiece, write_hf_tokenizer

    target = data_dir / "tokenizer"
    model = target / "tokenizer.model"
    if config.tokenizer.existing:
        source = existing_tokenizer_dir(config.tokenizer.existing)
        if source.resolve() != target.resolve():
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(source, target)
        if not (target / "tokenizer.json").is_file():
            write_hf_tokenizer(model, target)
        return model, "existing"
    if model.is_file() and not config.tokenizer.retrain:
        vocab_size = SentencePieceTokenizer(model).vocab_size
        if vocab_size != config.tokenizer.vocab_size:
            raise DataError(f"{model}: the data dir's tokenizer has vocab {vocab_size}, the corpus config asks "
                            f"{config.tokenizer.vocab_size}; set tokenizer.vocab_size={vocab_size} to keep it, or "
                            f"tokenizer.retrain=true to train a new one (a trunk trained on the old one refuses it)")
        if not (target / "tokenizer.json").is_file():
            write_hf_tokenizer(model, target)
        print(f"tokenizer: reusing {model} (sha256 {sha256_file(model)[:12]}); tokenizer.retrain=true trains a new "
              f"one", file=sys.stderr)
        return model, "reused"
    return train_sentencepiece(tokenizer_sample(config, data_dir), target, vocab_size=config.tokenizer.vocab_size,
                               threads=config.workers), "trained"


def _keys(config: CorpusConfig) -> tuple[str, str]:
    clean_key = _hash([s.model_dump() for s in config.sources] + [config.clean.model_dump(), config.docs_per_shard])
    # `retrain` is an instruction, not a property of the output (it is left out: keys of existing dirs stay).
    return clean_key, _hash([clean_key, config.tokenizer.model_dump(exclude={"retrain"}), config.seed])


def stage_clean(config: CorpusConfig, data_dir: Path) -> dict:
    """Sources → clean text parts + report.json (skipped when done with this config)."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    markers = StageMarkers(data_dir)
    clean_key, _ = _keys(config)
    if not markers.done("clean", clean_key):
        markers.clear_from(["clean", "tokenizer"])
        report = clean_and_dedup(config, data_dir)
        dump_report(data_dir / "report.json", report)
        markers.mark("clean", clean_key)
    return json.loads((data_dir / "report.json").read_text())


def stage_tokenizer(config: CorpusConfig, data_dir: Path) -> Path:
    """Clean text → SentencePiece tokenizer + HF twin (skipped when done with this config)."""
    data_dir = Path(data_dir)
    markers = StageMarkers(data_dir)
    clean_key, tokenizer_key = _keys(config)
    if not markers.done("clean", clean_key):
        raise DataError(f"{data_dir}: the clean stage has not finished for this corpus config; run it first")
    # A tokenizer kept from an earlier run is trained anew only when asked (`tokenizer.retrain`).
    retrain = config.tokenizer.retrain and markers.info("tokenizer").get("how") in ("reused", "existing")
    if not markers.done("tokenizer", tokenizer_key) or retrain:
        model, how = train_tokenizer(config, data_dir)
        for source in config.sources:  # shards of another tokenizer (or of other clean text) must not survive
            shutil.rmtree(data_dir / source.name, ignore_errors=True)
        markers.mark("tokenizer", tokenizer_key, how=how, sha256=sha256_file(model))
    return data_dir / "tokenizer"


def stage_shards(config: CorpusConfig, data_dir: Path) -> Manifest:
    """Clean text + tokenizer → token shards and manifest.json (finished shards are skipped one by one)."""
    data_dir = Path(data_dir)
    _, tokenizer_key = _keys(config)
    if not StageMarkers(data_dir).done("tokenizer", tokenizer_key):
        raise DataError(f"{data_dir}: the tokenizer stage has not finished for this corpus config; run it first")
    tokenizer_model = data_dir / "tokenizer" / "tokenizer.model"
    shards = tokenize_parts(data_dir, tokenizer_model, config.workers, config.executor, config.dask_address)
    from data_prep.tokenizer import SentencePieceTokenizer

    tokenizer = SentencePieceTokenizer(tokenizer_model)
    sources = [SourceEntry(name=s.name, weight=s.weight, shards=shards[s.name]) for s in config.sources if s.name in shards]
    if not sources or sum(src.num_tokens for src in sources) == 0:
        raise DataError(f"{config.name}: no tokens after tokenization; the corpus is empty")
    manifest = Manifest(
        tokenizer=TokenizerEntry(path="tokenizer/tokenizer.model", sha256=sha256_file(tokenizer_model),
                                 vocab_size=tokenizer.vocab_size, eos_id=tokenizer.eos_id),
        sources=sources,
    )
    write_manifest(data_dir, manifest)
    return manifest


STEPS = ("clean", "tokenizer", "shards")


def finished(config: CorpusConfig, data_dir: str | Path, step: str) -> bool:
    """Whether `step`'s output is on disk for this config: `clean` and `tokenizer` by their stage marker's key,
    `shards` by manifest.json."""
    data_dir = Path(data_dir)
    if step not in STEPS:
        raise ValueError(f"unknown data step {step!r}; one of {', '.join(STEPS)}")
    if step == "shards":
        return (data_dir / MANIFEST_NAME).is_file()
    clean_key, tokenizer_key = _keys(config)
    return data_dir.is_dir() and StageMarkers(data_dir).done(step, clean_key if step == "clean" else tokenizer_key)


def prepare(config: CorpusConfig, data_dir: str | Path) -> Manifest:
    stage_clean(config, Path(data_dir))
    stage_tokenizer(config, Path(data_dir))
    return stage_shards(config, Path(data_dir))
