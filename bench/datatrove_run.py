"""The datatrove side of the data benches; runs in its own venv (bench/.venv-datatrove, from
bench/requirements-datatrove.txt), started by bench/data_scale.py and bench/data.py as a subprocess.

    bench/.venv-datatrove/bin/python bench/datatrove_run.py pipeline --input DIR --work DIR --workers 2 \
        --tokenizer OUT/tokenizer/tokenizer.json --result result.json
    bench/.venv-datatrove/bin/python bench/datatrove_run.py dedup --input DIR --work DIR --result result.json

Input: JSONL(.gz) files with `{"text", "id"}` under --input (any depth). `pipeline` is datatrove's own pipeline
for what Genesis's data stage does, on LocalPipelineExecutor with --workers processes:

  1. JsonlReader → clean (Genesis's clean rules, `GenesisClean`) → MinhashDedupSignature      tasks = files
  2. MinhashDedupBuckets                                                                     tasks = 14 (one per band)
  3. MinhashDedupCluster (save_cluster_id, to tell the benches which document each removal kept)  1 task
  4. JsonlReader → clean → MinhashDedupFilter → DocumentTokenizer (Genesis's tokenizer.json)  tasks = files

Step 4 also runs `ClusterRecorder` (before the filter): a line per document of a duplicate cluster, for the
benches' scoring; its small cost counts against datatrove.

`dedup` runs steps 1–3 and the filter of step 4 without the clean step and the tokenizer, in one process, for
bench/data.py.

MinHash mapped onto Genesis's settings: MinhashConfig(n_grams=5, num_buckets=14, hashes_per_bucket=8) = 112
hashes in 14 bands × 8 rows (the same LSH S-curve, threshold (1/14)^(1/8) ≈ 0.72); shingles are the same as
Genesis's: a whitespace word tokenizer (`WhitespaceWords`) over text that datatrove's simplify_text only
lower-cases and whitespace-normalises (TextNormConfig with punctuation, number and diacritics normalisation off;
datatrove's default English path would use spaCy and strip punctuation); 64-bit xxhash (HashConfig(precision=64),
as datatrove's example recommends). The difference that remains is datatrove's design: any pair sharing one band
bucket is a duplicate (no verification), where Genesis also probes offset bands and keeps a candidate pair only at
exact shingle Jaccard ≥ 0.65. datatrove does not run an exact-dedup pass here (identical texts share every band,
so MinHash removes them; Genesis's exact pass is extra work on its side). DocumentTokenizer runs with
shuffle_documents=False (Genesis's shards are not shuffled either) and one tokenizer thread per process
(TOKENIZERS_PARALLELISM=false), so --workers is the number of cores it uses, as for Genesis.

Result (--result, JSON): per-stage seconds, the steps' document counts, tokens, and `clusters_file`
(`<work>/clusters.jsonl`), which the benches score: every document of a duplicate cluster as
`{"id", "cluster", "removed"}` (one kept document per cluster).
"""

from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAYON_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import unicodedata  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from datatrove.executor.local import LocalPipelineExecutor  # noqa: E402
from datatrove.pipeline.base import PipelineStep  # noqa: E402
from datatrove.pipeline.dedup.minhash import (  # noqa: E402
    MinhashConfig,
    MinhashDedupBuckets,
    MinhashDedupCluster,
    MinhashDedupFilter,
    MinhashDedupSignature,
)
from datatrove.pipeline.readers import JsonlReader  # noqa: E402
from datatrove.utils.hashing import HashConfig  # noqa: E402
from datatrove.utils.text import TextNormConfig  # noqa: E402
from datatrove.utils.word_tokenizers import WordTokenizer  # noqa: E402

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


class WhitespaceWords(WordTokenizer):
    """Words = whitespace-separated tokens, Genesis's and datasketch's shingling."""

    def word_tokenize(self, text: str) -> list[str]:
        return text.split()

    def sent_tokenize(self, text: str) -> list[str]:
        return [line for line in text.split("\n") if line.strip()]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return [(0, len(text))]


class GenesisClean(PipelineStep):
    """Genesis's clean stage with its default CleanConfig: NFC, CRLF → LF, control characters removed; dropped when
    shorter than min_chars (stripped), longer than max_chars, over 1% control characters, or when more than half
    of its lines (≥ 4 non-blank) are repeated."""

    name = "Genesis clean rules"
    type = "🔻 - FILTER"

    def __init__(self, min_chars: int = 32, max_chars: int = 500_000, max_duplicate_line_fraction: float = 0.5,
                 max_control_char_fraction: float = 0.01):
        super().__init__()
        self.min_chars, self.max_chars = min_chars, max_chars
        self.max_dup, self.max_control = max_duplicate_line_fraction, max_control_char_fraction

    def reason(self, text: str, removed: int, original_length: int) -> str | None:
        if len(text.strip()) < self.min_chars:
            return "too_short"
        if len(text) > self.max_chars:
            return "too_long"
        if original_length and removed / original_length > self.max_control:
            return "control_characters"
        lines = [line.strip() for line in text.split("\n") if line.strip()]
        if len(lines) >= 4:
            counts = Counter(lines)
            if sum(n for n in counts.values() if n > 1) / len(lines) > self.max_dup:
                return "repeated_lines"
        return None

    def run(self, data, rank: int = 0, world_size: int = 1):
        for doc in data:
            with self.track_time():
                original = len(doc.text)
                text, removed = _CONTROL.subn("", unicodedata.normalize("NFC", doc.text).replace("\r\n", "\n"))
                why = self.reason(text, removed, original)
                self.stat_update("total")
                if why:
                    self.stat_update(f"dropped_{why}")
                    continue
                doc.text = text
                self.stat_update("forwarded")
            yield doc


class ClusterRecorder(PipelineStep):
    """Placed before MinhashDedupFilter (same documents, same order as stage 1): writes every document of a
    duplicate cluster as {"id", "cluster", "removed"} from stage 3's .clusters and .remove files."""

    name = "bench: record clusters"
    type = "💽 - WRITER"

    def __init__(self, remove_ids: str, out: str):
        super().__init__()
        self.remove_ids, self.out = remove_ids, out

    def run(self, data, rank: int = 0, world_size: int = 1):
        clusters_file = Path(self.remove_ids) / f"{rank:06d}.clusters"
        remove_file = Path(self.remove_ids) / f"{rank:06d}.remove"
        clusters = {}
        if clusters_file.is_file():
            pairs = np.fromfile(clusters_file, dtype="<u4").reshape(-1, 2)
            clusters = dict(zip(pairs[:, 0].tolist(), pairs[:, 1].tolist()))
        removed = set(np.fromfile(remove_file, dtype="<u4").tolist()) if remove_file.is_file() else set()
        Path(self.out).mkdir(parents=True, exist_ok=True)
        with open(Path(self.out) / f"{rank:05d}.jsonl", "w", encoding="utf-8") as handle:
            for index, doc in enumerate(data):
                if index in clusters:
                    handle.write(json.dumps({"id": doc.id, "cluster": clusters[index], "removed": index in removed}) + "\n")
                yield doc


def minhash_config() -> MinhashConfig:
    return MinhashConfig(n_grams=5, num_buckets=14, hashes_per_bucket=8, seed=1,
                         norm_config=TextNormConfig(lowercase=True, norm_whitespace=True, remove_punctuation=False,
                                                    norm_unicode_diacritics=False, norm_numbers=False),
                         hash_config=HashConfig(precision=64, hash_fc="xxhash"))


def count_files(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.is_file() and (p.name.endswith(".jsonl") or p.name.endswith(".jsonl.gz")))


def reader(folder: Path) -> JsonlReader:
    return JsonlReader(str(folder), glob_pattern="**/*.jsonl*", recursive=True, text_key="text", id_key="id")


def run(args: argparse.Namespace) -> dict:
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    config = minhash_config()
    files = count_files(Path(args.input))
    tasks = args.tasks or files
    workers = 1 if args.mode == "dedup" else args.workers
    # dedup mode (bench/data.py) compares MinHash alone: no clean step there
    clean = [GenesisClean(min_chars=args.min_chars)] if args.mode == "pipeline" else []
    timings = {}
    signatures, buckets, remove_ids = work / "signatures", work / "buckets", work / "remove_ids"

    def stage(name: str, pipeline: list, stage_tasks: int, stage_workers: int) -> None:
        started = time.perf_counter()
        LocalPipelineExecutor(pipeline=pipeline, tasks=stage_tasks, workers=min(stage_workers, stage_tasks),
                              logging_dir=str(work / "logs" / name)).run()
        timings[name] = round(time.perf_counter() - started, 3)
        print(f"datatrove {name}: {timings[name]} s", file=sys.stderr, flush=True)

    stage("signatures", [reader(Path(args.input)), *clean,
                         MinhashDedupSignature(output_folder=str(signatures), config=config,
                                               language=WhitespaceWords())], tasks, workers)
    stage("buckets", [MinhashDedupBuckets(input_folder=str(signatures), output_folder=str(buckets), config=config)],
          config.num_buckets, workers)
    stage("cluster", [MinhashDedupCluster(input_folder=str(buckets), output_folder=str(remove_ids), config=config,
                                          save_cluster_id=True)], 1, 1)
    last = [reader(Path(args.input)), *clean,
            ClusterRecorder(str(remove_ids), str(work / "clusters")), MinhashDedupFilter(input_folder=str(remove_ids))]
    if args.mode == "pipeline":
        from datatrove.pipeline.tokens import DocumentTokenizer

        last.append(DocumentTokenizer(output_folder=str(work / "tokens"), tokenizer_name_or_path=args.tokenizer,
                                      eos_token="<|endoftext|>", shuffle_documents=False))
    stage("filter_tokenize" if args.mode == "pipeline" else "filter", last, tasks, workers)

    stats = json.loads((work / "logs" / ("filter_tokenize" if args.mode == "pipeline" else "filter") / "stats.json").read_text())
    counts: dict = {}
    for step in stats:
        name = re.sub(r"[^\x20-\x7e]", "", step.get("name", "")).strip(" -:")
        values = step.get("stats", {})
        for key in ("total", "forwarded", "dropped", "tokens"):
            if key in values:
                value = values[key]
                counts[f"{name}:{key}"] = value.get("total", value) if isinstance(value, dict) else value
    with open(work / "clusters.jsonl", "w", encoding="utf-8") as out:
        for part in sorted((work / "clusters").glob("*.jsonl")):
            out.write(part.read_text())
    tokens = None
    if args.mode == "pipeline":
        token_bytes = sum(p.stat().st_size for p in (work / "tokens").glob("*.ds"))
        tokens = token_bytes // 2  # uint16 ids (the vocab is ≤ 65,536)
    result = {"timings": timings, "seconds": round(sum(timings.values()), 3), "tasks": tasks, "workers": workers,
              "files": files, "tokens": tokens, "step_counts": counts,
              "minhash": {"n_grams": 5, "num_buckets": 14, "hashes_per_bucket": 8, "precision": 64, "hash": "xxhash",
                          "words": "whitespace", "norm": "lowercase + whitespace"},
              "clusters_file": str(work / "clusters.jsonl")}
    from importlib.metadata import version

    result["datatrove"] = version("datatrove")
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("pipeline", "dedup"))
    parser.add_argument("--input", required=True)
    parser.add_argument("--work", required=True)
    parser.add_argument("--result", required=True)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--tasks", type=int, default=0, help="tasks of steps 1 and 4 (default: one per input file)")
    parser.add_argument("--tokenizer", help="tokenizer.json (pipeline mode)")
    parser.add_argument("--min-chars", type=int, default=32)
    args = parser.parse_args()
    if args.mode == "pipeline" and not args.tokenizer:
        parser.error("pipeline needs --tokenizer")
    result = run(args)
    Path(args.result).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
