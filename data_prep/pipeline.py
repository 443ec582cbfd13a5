"""The data stage end to end, at corpus scale: streamed, partitioned, out of core, on Dask.

    prepare(corpus_config, data_dir) -> Manifest

    read + clean   each source's read units (files, hub stream shards) → clean parts + MinHash band keys
                   (`data_prep.read`)
    dedup          exact and near duplicates across the whole corpus and across sources → dedup/removed.parquet
                   (`data_prep.dedup_parts`)
    tokenizer      SentencePiece BPE on a bounded, mixture-weighted sample of the kept text (or the trunk's)
    shards         each clean part minus its removed rows → one token shard; each source cut to its token_budget
                   in real tokens; manifest.json, and report.json with every source's repetition at the planned
                   training tokens

Every phase is a list of jobs that each write their own output (see `data_prep.executor` for where they run),
so memory is bounded by one part and the worker count, and a killed run redoes only unfinished jobs. The
stage markers (`.stages/<step>.json`) hold the key of the config and local inputs that produced a step.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path


from data_prep.dedup_parts import (Part, deduplicate_parts, has_key, read_removed, removed_counts, removed_rows,
                                   write_key)
from data_prep.dedup_parts import reset as reset_dedup
from data_prep.executor import Executor, make_executor
from data_prep.read import open_clean_part, plan_units, read_unit
from data_prep.shards import dump_report, sidecar_of, tokenize_part
from data_prep.sources import CorpusConfig
from genesis.errors import DataError
from genesis.manifest import MANIFEST_NAME, Manifest, SourceEntry, TokenizerEntry, sha256_file, write_manifest

Log = Callable[[str], None]


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


# -------------------------------------------------------------------------------------------------------------
# Keys: what a step's output depends on


def _read_key(config: CorpusConfig) -> str:
    """What every read unit's output depends on besides its own inputs (not the executor or worker count)."""
    return _hash([[s.model_dump() for s in config.sources], config.clean.model_dump(), config.docs_per_shard,
                  config.budget_read_margin, config.hub_read_units])


def _local_inputs(config: CorpusConfig) -> list[str]:
    """Name, size and mtime of every local source file: a file changed since the last run is read again."""
    from data_prep.sources import source_files

    fingerprints = []
    for source in config.sources:
        if source.kind == "local":
            for path in source_files(source):
                stat = path.stat()
                fingerprints.append(f"{source.name}/{path.name}:{stat.st_size}:{stat.st_mtime_ns}")
    return fingerprints


def _keys(config: CorpusConfig) -> tuple[str, str]:
    clean_key = _hash([_read_key(config), _local_inputs(config), config.dedup_shuffle_rows])
    # `retrain` is an instruction, not a property of the output (it is left out: keys of existing dirs stay).
    return clean_key, _hash([clean_key, config.tokenizer.model_dump(exclude={"retrain"}), config.seed])


class TallyingExecutor:
    """Counts, per phase, the jobs that ran and the jobs skipped because their output was already there."""

    def __init__(self, inner: Executor):
        self.inner, self.workers = inner, inner.workers
        self.jobs: dict[str, dict[str, int]] = {}

    def map(self, function, jobs, label, sizes=None):
        results = self.inner.map(function, jobs, label, sizes)
        skipped = sum(bool(isinstance(r, dict) and r.get("skipped")) for r in results)
        self.jobs[label] = {"total": len(results), "run": len(results) - skipped, "skipped": skipped}
        ran = [r for r in results if isinstance(r, dict) and "peak_rss_kib" in r]
        if ran:  # the largest process peak seen at the end of this phase's jobs; the most a job started from
            self.jobs[label]["peak_rss_gib"] = round(max(r["peak_rss_kib"] for r in ran) / 2**20, 3)
            self.jobs[label]["start_rss_gib"] = round(max(r["start_rss_kib"] for r in ran) / 2**20, 3)
        return results

    def close(self) -> None:
        self.inner.close()


@contextmanager
def _executor(config: CorpusConfig, executor: Executor | None, log: Log | None):
    if executor is not None:
        yield executor if isinstance(executor, TallyingExecutor) else TallyingExecutor(executor)
        return
    made = TallyingExecutor(make_executor(config.executor, config.workers, config.dask_address, log))
    try:
        yield made
    finally:
        made.close()


def _say(log: Log | None, line: str) -> None:
    (log or (lambda text: print(text, file=sys.stderr)))(line)


# -------------------------------------------------------------------------------------------------------------
# read + clean, dedup


def corpus_parts(config: CorpusConfig, data_dir: Path) -> list[Part]:
    """Every clean part in corpus order (source, unit, part), from the read units' markers: the order in which
    duplicates are kept, and the numbering dedup's per-part files use."""
    parts: list[Part] = []
    for source in config.sources:
        folder = data_dir / "units" / source.name
        for marker in sorted(folder.glob("u*.json")) if folder.is_dir() else []:
            for name in json.loads(marker.read_text())["parts"]:
                parts.append(Part(index=len(parts), source=source.name, name=name))
    return parts


def _drop_unplanned(config: CorpusConfig, data_dir: Path, units) -> None:
    """Remove the outputs of units and sources that the config no longer reads (a removed file or source)."""
    planned = {(u.source, u.name) for u in units}
    names = {s.name for s in config.sources}
    for folder in ("units", "clean", "sig"):
        root = data_dir / folder
        if not root.is_dir():
            continue
        for source_dir in root.iterdir():
            if source_dir.name not in names:
                shutil.rmtree(source_dir)
                continue
            for path in source_dir.iterdir():
                if (source_dir.name, path.name.split("-")[0].split(".")[0]) not in planned:
                    path.unlink()


def stage_clean(config: CorpusConfig, data_dir: Path, executor: Executor | None = None, log: Log | None = None) -> dict:
    """Sources → clean parts → dedup → report.json (skipped when done for this config and these inputs)."""
    data_dir = Path(data_dir)
    clean_key, _ = _keys(config)
    if data_dir.is_dir() and StageMarkers(data_dir).done("clean", clean_key):
        return json.loads((data_dir / "report.json").read_text())
    started = time.monotonic()
    units = plan_units(config)  # the first network access for hub sources: nothing is written before it
    data_dir.mkdir(parents=True, exist_ok=True)
    markers = StageMarkers(data_dir)
    markers.clear_from(["clean", "tokenizer"])
    timings: dict[str, float] = {}
    with _executor(config, executor, log) as runner:
        read_key = _read_key(config)
        sources = {s.name: s for s in config.sources}
        jobs = [(unit, sources[unit.source], config.clean, config.docs_per_shard, config.on_bad_record, str(data_dir),
                 read_key) for unit in units]
        infos = runner.map(read_unit, jobs, "read + clean", sizes=[unit.size for unit in units])
        _drop_unplanned(config, data_dir, units)
        timings["read_clean"] = time.monotonic() - started

        started = time.monotonic()
        parts = corpus_parts(config, data_dir)
        total_docs = sum(info["docs_clean"] for info in infos)
        if total_docs == 0:
            raise DataError(f"{config.name}: no document survived filtering; check the sources and filters "
                            f"(report: {data_dir / 'report.json'})")
        dedup_key = _hash([clean_key, [(u.source, u.name, u.fingerprint) for u in units],
                           [(p.source, p.name) for p in parts]])
        if not has_key(data_dir, dedup_key):
            reset_dedup(data_dir)
            write_key(data_dir, dedup_key)
        if config.clean.exact_dedup or config.clean.near_dedup:
            totals = deduplicate_parts(data_dir, parts, config.clean, runner, config.dedup_shuffle_rows,
                                       config.dedup_verify_pairs, total_docs)
        else:
            totals = deduplicate_parts(data_dir, [], config.clean, runner, config.dedup_shuffle_rows,
                                       config.dedup_verify_pairs, 1)
        timings["dedup"] = time.monotonic() - started
    report = _clean_report(config, data_dir, units, infos, parts)
    report["_dedup_totals"] = totals
    report["_timings"] = {name: round(seconds, 3) for name, seconds in timings.items()}
    report["_jobs"] = dict(runner.jobs)
    if not any(row["docs_out"] for name, row in report.items() if not name.startswith("_")):
        raise DataError(f"{config.name}: no document survived filtering and dedup; check the sources and filters")
    dump_report(data_dir / "report.json", report)
    markers.mark("clean", clean_key)
    return report


def _clean_report(config: CorpusConfig, data_dir: Path, units, infos: list[dict], parts: list[Part]) -> dict:
    """Per source: what was read, why documents were dropped, duplicates removed (with examples), what is left."""
    report: dict = {}
    for source in config.sources:
        counts: Counter = Counter()
        docs_clean = bytes_clean = 0
        for unit, info in zip(units, infos):
            if unit.source == source.name:
                counts.update(info["counts"])
                docs_clean += info["docs_clean"]
                bytes_clean += info["bytes_clean"]
        report[source.name] = dict(counts) | {"license": source.license, "weight": source.weight,
                                              "docs_clean": docs_clean, "bytes_clean": bytes_clean,
                                              "exact_duplicates_removed": 0, "near_duplicates_removed": 0,
                                              "duplicate_examples": []}
    for (source, kind), count in removed_counts(data_dir).items():
        report[source][f"{kind}_duplicates_removed"] = count
    import pyarrow.compute as pc

    removed = read_removed(data_dir)
    names = {(p.source, p.name): p for p in parts}
    for source in config.sources:
        for row in removed.filter(pc.equal(removed.column("source"), source.name)).slice(0, 3).to_pylist():
            removed_text = _text_at(data_dir, names[(row["source"], row["part"])], row["row"])
            kept_text = _text_at(data_dir, names[(row["kept_source"], row["kept_part"])], row["kept_row"])
            report[source.name]["duplicate_examples"].append({"kind": row["kind"], "removed": removed_text[:300],
                                                              "kept": kept_text[:300], "kept_source": row["kept_source"]})
    for source in config.sources:
        entry = report[source.name]
        entry["docs_out"] = entry["docs_clean"] - entry["exact_duplicates_removed"] - entry["near_duplicates_removed"]
    return report


def _text_at(data_dir: Path, part: Part, row: int) -> str:
    import pyarrow as pa

    return open_clean_part(part.clean_path(data_dir)).column("text").take(pa.array([row]))[0].as_py()


# -------------------------------------------------------------------------------------------------------------
# tokenizer


def _parts_by_source(config: CorpusConfig, data_dir: Path) -> dict[str, list[Part]]:
    by_source: dict[str, list[Part]] = {s.name: [] for s in config.sources}
    for part in corpus_parts(config, data_dir):
        by_source[part.source].append(part)
    return by_source


def tokenizer_sample(config: CorpusConfig, data_dir: Path) -> list[str]:
    """Lines for tokenizer training: `tokenizer.sample_sentences` in all, drawn across sources in proportion to
    their weights, from documents dedup kept. Bounded: each source's parts are visited in a seeded random order
    and each part gives at most 1/16 of the source's quota (1/n of a source of n < 16 parts), so the sample spans
    many parts and reading stops as soon as the quota is met, however large the corpus."""
    rng = random.Random(config.seed)
    total_weight = sum(s.weight for s in config.sources)
    sample: list[str] = []
    for source, parts in _parts_by_source(config, data_dir).items():
        weight = next(s.weight for s in config.sources if s.name == source)
        want = max(1, int(config.tokenizer.sample_sentences * weight / total_weight))
        # 1/16 of the quota a part (the quota from fewer parts when the source has fewer than 16)
        per_part = max(1, -(-want // max(1, min(16, len(parts)))))
        order = list(parts)
        rng.shuffle(order)
        lines: list[str] = []
        for part in order:
            table = open_clean_part(part.clean_path(data_dir))
            dropped = set(removed_rows(data_dir, part).tolist())
            rows = [row for row in range(table.num_rows) if row not in dropped]
            rng.shuffle(rows)
            taken = 0
            for row in rows:
                text = table.column("text")[row].as_py()
                new = [line for line in text.split("\n") if line.strip()]
                lines += new
                taken += len(new)
                if taken >= per_part:
                    break
            if len(lines) >= want:
                break
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
                               threads=config.tokenizer.threads), "trained"


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
        started = time.monotonic()
        model, how = train_tokenizer(config, data_dir)
        for source in config.sources:  # shards of another tokenizer (or of other clean text) must not survive
            shutil.rmtree(data_dir / source.name, ignore_errors=True)
        (data_dir / MANIFEST_NAME).unlink(missing_ok=True)
        markers.mark("tokenizer", tokenizer_key, how=how, sha256=sha256_file(model),
                     seconds=round(time.monotonic() - started, 3))
    return data_dir / "tokenizer"


# -------------------------------------------------------------------------------------------------------------
# shards


def _mixture(config: CorpusConfig, tokens: dict[str, int]) -> dict:
    """Each source's share of the training mixture and, with `planned_tokens`, how often it will be repeated."""
    total_weight = sum(s.weight for s in config.sources if tokens.get(s.name))
    mixture = {}
    for source in config.sources:
        have = tokens.get(source.name, 0)
        share = source.weight / total_weight if have and total_weight else 0.0
        row = {"tokens": have, "weight_share": round(share, 6), "token_budget": source.token_budget}
        if config.planned_tokens:
            drawn = share * config.planned_tokens
            row |= {"planned_tokens": int(drawn), "epochs": round(drawn / have, 4) if have else None,
                    "repeats": bool(have and drawn > have)}
        mixture[source.name] = row
    return mixture


def stage_shards(config: CorpusConfig, data_dir: Path, executor: Executor | None = None, log: Log | None = None) -> Manifest:
    """Clean parts − removed rows + tokenizer → token shards, manifest.json and the report's mixture (finished
    shards whose bytes still match are skipped one by one; a corrupt or truncated shard is rebuilt)."""
    from data_prep.tokenizer import SentencePieceTokenizer

    data_dir = Path(data_dir)
    _, tokenizer_key = _keys(config)
    if not StageMarkers(data_dir).done("tokenizer", tokenizer_key):
        raise DataError(f"{data_dir}: the tokenizer stage has not finished for this corpus config; run it first")
    tokenizer_model = data_dir / "tokenizer" / "tokenizer.model"
    jobs, owners, sizes = [], [], []
    for source, source_parts in _parts_by_source(config, data_dir).items():
        for part in source_parts:
            clean_path = part.clean_path(data_dir)
            jobs.append((str(clean_path), str(data_dir / source / f"{part.name}.arrow"), str(tokenizer_model),
                         str(data_dir / "dedup" / "removed" / f"{part.index:07d}.npy"), str(data_dir)))
            owners.append(source)
            sizes.append(clean_path.stat().st_size)
    if not jobs:
        raise DataError(f"{data_dir / 'clean'}: no clean parts; the corpus is empty after filtering")
    started = time.monotonic()
    with _executor(config, executor, log) as runner:
        results = runner.map(tokenize_part, jobs, "tokenize", sizes=sizes)
    seconds = time.monotonic() - started

    budgets = {s.name: s.token_budget for s in config.sources}
    by_source: dict[str, list] = {}
    beyond_budget: Counter = Counter()
    for owner, result in zip(owners, results):
        for key in ("skipped", "docs", "bytes", "text_bytes", "start_rss_kib", "peak_rss_kib"):
            result.pop(key, None)
        if not result["num_docs"]:
            continue
        shards = by_source.setdefault(owner, [])
        budget = budgets[owner]
        if budget and sum(s["num_tokens"] for s in shards) >= budget:
            # The source's token_budget is in tokens after dedup: shards past it stay out of the manifest.
            beyond_budget[owner] += result["num_tokens"]
            shard = data_dir / result["path"]
            shard.unlink(missing_ok=True)
            sidecar_of(shard).unlink(missing_ok=True)
            continue
        shards.append(result)
    from genesis.manifest import ShardEntry

    sources = [SourceEntry(name=s.name, weight=s.weight, shards=[ShardEntry.model_validate(r) for r in by_source[s.name]])
               for s in config.sources if by_source.get(s.name)]
    if not sources or sum(src.num_tokens for src in sources) == 0:
        raise DataError(f"{config.name}: no tokens after tokenization; the corpus is empty")
    tokenizer = SentencePieceTokenizer(tokenizer_model)
    manifest = Manifest(
        tokenizer=TokenizerEntry(path="tokenizer/tokenizer.model", sha256=sha256_file(tokenizer_model),
                                 vocab_size=tokenizer.vocab_size, eos_id=tokenizer.eos_id),
        sources=sources,
    )
    report_path = data_dir / "report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    tokens = {source.name: source.num_tokens for source in sources}
    for name, count in tokens.items():
        if name in report:
            report[name]["tokens"] = count
            report[name]["tokens_beyond_budget_dropped"] = beyond_budget[name]
    report["_mixture"] = _mixture(config, tokens)
    report.setdefault("_timings", {})["tokenize"] = round(seconds, 3)
    report.setdefault("_jobs", {}).update(runner.jobs)
    tokenizer_seconds = StageMarkers(data_dir).info("tokenizer").get("seconds")
    if tokenizer_seconds is not None:
        report["_timings"]["tokenizer"] = tokenizer_seconds
    dump_report(report_path, report)
    for name, row in report["_mixture"].items():
        if row.get("repeats"):
            _say(log, f"warning: source '{name}' will be seen {row['epochs']:.2f} times over planned_tokens="
                      f"{config.planned_tokens:,} at weight share {row['weight_share']:.3f} ({row['tokens']:,} tokens); "
                      f"add data to it or lower its weight for zero repetition")
        budget = budgets.get(name)
        if budget and row["tokens"] < budget:
            _say(log, f"note: source '{name}' has {row['tokens']:,} tokens after dedup, under its token_budget "
                      f"{budget:,}; raise budget_read_margin (now {config.budget_read_margin}) to read more")
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


def prepare(config: CorpusConfig, data_dir: str | Path, executor: Executor | None = None, log: Log | None = None) -> Manifest:
    """All three steps. A data directory this call created is removed again when the input is bad (a DataError):
    nothing half-written is left. One that held work before keeps it, every finished job resumable."""
    data_dir = Path(data_dir)
    fresh = not data_dir.exists()
    try:
        with _executor(config, executor, log) as runner:
            stage_clean(config, data_dir, runner, log)
            stage_tokenizer(config, data_dir)
            return stage_shards(config, data_dir, runner, log)
    except DataError:
        if fresh:
            shutil.rmtree(data_dir, ignore_errors=True)
        raise
