"""The data stage at corpus scale (issue #24, "Numbers"), Genesis and datatrove side by side in one run.

    python bench/data_scale.py                                   # 0.25, 1 and 4 GB, 2 workers
    python bench/data_scale.py --sizes 0.02 --work /tmp/ds       # a quick trial

For each size (smallest first):

1. builds the scale corpus (bench/scale_corpus.py: the data kit re-mixed into six local sources of many JSONL
   files, planted near-duplicate pairs recorded in planted.jsonl; reused when already built);
2. runs `genesis data prepare --corpus <corpus.yaml> --out <dir> executor=dask workers=N` as a subprocess while
   a sampler reads, every 0.2 s, the resident memory and CPU time of the driver and of every process under it
   (Dask nannies and workers); records wall time, the stage's own per-stage timings (`_timings` of report.json)
   and the peak RSS of the driver and of the largest worker;
3. scores Genesis's removals (`dedup/removed.parquet`, rows of `clean/<source>/<part>.arrow`) on the planted
   pairs: recall and precision (below);
4. on the middle size only: SentencePiece encode of the stage's surviving documents (a sample of --spm-sample-mb)
   in 1 and in 2 processes, the anchor for tokenize-to-shards per process; then the same prepare with 1 worker
   (dask_2_vs_1);
5. runs datatrove on the same corpus with the same number of workers (bench/datatrove_run.py in
   bench/.venv-datatrove: clean with Genesis's rules → MinHash signatures → buckets → clusters → filter →
   DocumentTokenizer with Genesis's HF twin tokenizer.json), sampled the same way, and scores its removals.

Scoring. A planted pair counts as found when either of its documents was removed. A removal is right when the
document it was matched to (Genesis: removed.parquet's kept_*; datatrove: the kept member of its cluster) is its
planted partner, or when the two have exact 5-gram shingle Jaccard ≥ 0.7 (a real near-duplicate the re-mix made
by chance). Documents are recognised by a hash of their text (scale_corpus.text_key), so no stage needs to carry
the corpus's ids.

Throughput. docs_per_core_s = input documents / (wall seconds × workers), with Genesis's wall less its tokenizer
training (`_timings["tokenizer"]`; datatrove reuses that tokenizer and trains none); both walls are the whole
subprocess as a user runs it (start-up, Dask cluster, every stage). Each run records the box's core count and
load average before and after: on a shared box a busy neighbour slows either side.

Sizes and memory. `--file-mb 4` writes every corpus file at 4 MB whatever the size (a hub dataset's shards are one
size however many there are), so a part, the unit of a worker's memory, is the same at every size; without it
files grow with the corpus (size/48) and so do the parts. `--genesis-override dedup_shuffle_rows=50000` bounds a
dedup bucket job below the smallest size's document count, so every size has full jobs (at the default, 4M keys,
one job holds the whole band of any corpus under ~20 GB).

Splitting a run. `--datatrove-at`, `--one-worker-at`, `--score-at` put the datatrove comparison, the 1-worker run
and the scoring at one size; `--figures` names the top-level figures a run sets (a run of the 1-worker comparison
alone leaves the scale figures as measured before); `figure_runs` says which run each top-level figure is from.

Results: one run appended to bench/results/data_scale.json (bench.common.append_run), with the latest figures at
the top level (see `latest` in main()).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import scale_corpus  # noqa: E402
from bench.common import append_run, environment, git_dirty, git_rev, host_contention  # noqa: E402

GENESIS = REPO / ".venv" / "bin" / "genesis"
DATATROVE_PYTHON = REPO / "bench" / ".venv-datatrove" / "bin" / "python"
GIB = 2**30
JACCARD_RIGHT = 0.7


# ------------------------------------------------------------------------------------------------------------
# Measuring a subprocess tree


class TreeSampler:
    """Samples, every `interval` s, RSS and CPU time of `pid` (the driver) and of all its descendants."""

    def __init__(self, pid: int, interval: float = 0.2):
        import psutil

        self.psutil, self.root, self.interval = psutil, psutil.Process(pid), interval
        self.peak: dict[int, int] = {}
        self.cpu: dict[int, float] = {}
        self.cmd: dict[int, str] = {}
        self.tree_peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                processes = [self.root] + self.root.children(recursive=True)
            except self.psutil.Error:
                processes = []
            total = 0
            for process in processes:
                try:
                    with process.oneshot():
                        rss = process.memory_info().rss
                        times = process.cpu_times()
                        if process.pid not in self.cmd:
                            self.cmd[process.pid] = " ".join(process.cmdline())[:160]
                except self.psutil.Error:
                    continue
                total += rss
                self.peak[process.pid] = max(self.peak.get(process.pid, 0), rss)
                self.cpu[process.pid] = times.user + times.system
            self.tree_peak = max(self.tree_peak, total)
            self.samples += 1
            self._stop.wait(self.interval)

    def summary(self) -> dict:
        root = self.root.pid
        workers = {pid: peak for pid, peak in self.peak.items() if pid != root}
        return {
            "driver_peak_rss_gib": round(self.peak.get(root, 0) / GIB, 3),
            "max_worker_peak_rss_gib": round(max(workers.values(), default=0) / GIB, 3),
            "tree_peak_rss_gib": round(self.tree_peak / GIB, 3),
            "cpu_s": round(sum(self.cpu.values()), 1),
            "samples": self.samples,
            "processes": sorted(({"pid": pid, "driver": pid == root, "peak_rss_gib": round(peak / GIB, 3),
                                  "cpu_s": round(self.cpu.get(pid, 0.0), 1), "cmd": self.cmd.get(pid, "")}
                                 for pid, peak in self.peak.items()), key=lambda p: -p["peak_rss_gib"])[:24],
        }


def run_measured(command: list[str], log: Path, env: dict | None = None, timeout: float | None = None) -> dict:
    """Run `command` (stdout/stderr to `log`), sampling its process tree; wall time, rc, memory, CPU, load."""
    before = host_contention()
    started = time.perf_counter()
    with open(log, "w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO,
                                   env={**os.environ, **(env or {})})
        with TreeSampler(process.pid) as sampler:
            try:
                rc = process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                rc = process.wait()
    wall = time.perf_counter() - started
    result = {"command": " ".join(map(str, command)), "rc": rc, "wall_s": round(wall, 2), **sampler.summary(),
              "host_before": before, "host_after": host_contention()}
    if rc != 0:
        result["log_tail"] = log.read_text(errors="replace")[-3000:]
    return result


# ------------------------------------------------------------------------------------------------------------
# Ground truth and scoring


class Truth:
    """The corpus's documents (by text key) and planted pairs."""

    def __init__(self, root: Path):
        import pyarrow.parquet as pq

        index = pq.read_table(root / "index.parquet", columns=["id", "source", "file", "line", "key", "group"])
        ids = index.column("id").to_pylist()
        self.root = root
        self.docs = len(ids)
        self.key_to_id = dict(zip(index.column("key").to_pylist(), ids))
        self.group = {i: g for i, g in zip(ids, index.column("group").to_pylist()) if g >= 0}
        self.location = dict(zip(ids, zip(index.column("source").to_pylist(), index.column("file").to_pylist(),
                                          index.column("line").to_pylist())))
        self.pairs = [json.loads(line) for line in open(root / "planted.jsonl", encoding="utf-8")]
        self.partner = {}
        for pair in self.pairs:
            self.partner[pair["copy_id"]], self.partner[pair["original_id"]] = pair["original_id"], pair["copy_id"]

    def texts(self, ids: set[str]) -> dict[str, str]:
        """The corpus texts of `ids`, read from their files."""
        import gzip

        wanted: dict[tuple[str, int], dict[int, str]] = defaultdict(dict)
        for doc_id in ids:
            source, file, line = self.location[doc_id]
            wanted[(source, file)][line] = doc_id
        out = {}
        for (source, file), lines in wanted.items():
            path = next((self.root / "sources" / source).glob(f"part_{file:05d}.jsonl*"))
            opener = gzip.open if path.name.endswith(".gz") else open
            with opener(path, "rt", encoding="utf-8") as handle:
                for number, line in enumerate(handle):
                    if number in lines:
                        out[lines[number]] = json.loads(line)["text"]
                        if len(out) == len(ids):
                            break
        return out


def _bin(j: float) -> str:
    for low, high in ((0.0, 0.5), (0.5, 0.7), (0.7, 0.8), (0.8, 0.9), (0.9, 1.01)):
        if low <= j < high:
            return f"{low:.1f}-{min(high, 1.0):.1f}"
    return "?"


def score(truth: Truth, removed: dict[str, str | None], texts_of=None) -> dict:
    """Recall on planted pairs and precision of `removed` (removed id → id of the document it was matched to, or
    None when unknown). `texts_of(ids)` gives texts for the Jaccard check of removals not explained by a pair."""
    found = [p for p in truth.pairs if p["copy_id"] in removed or p["original_id"] in removed]
    by: dict[str, dict[str, list[int]]] = {"recipe": defaultdict(lambda: [0, 0]), "jaccard": defaultdict(lambda: [0, 0]),
                                           "placement": defaultdict(lambda: [0, 0])}
    found_groups = {p["group"] for p in found}
    for pair in truth.pairs:
        hit = pair["group"] in found_groups
        placement = "cross_source" if pair["cross_source"] else ("cross_file" if pair["cross_file"] else "same_file")
        for kind, key in (("recipe", pair["recipe"]), ("jaccard", _bin(pair["jaccard"])), ("placement", placement)):
            by[kind][key][0] += hit
            by[kind][key][1] += 1
    right = unknown_match = 0
    to_check: list[tuple[str, str]] = []
    for doc, match in removed.items():
        group = truth.group.get(doc)
        if match is None:
            unknown_match += 1
            right += group is not None and truth.partner.get(doc) not in removed
        elif group is not None and truth.group.get(match) == group:
            right += 1
        else:
            to_check.append((doc, match))
    justified = 0
    if to_check and texts_of is not None:
        texts = texts_of({d for pair in to_check for d in pair})
        justified = sum(scale_corpus.jaccard(texts[a], texts[b]) >= JACCARD_RIGHT
                        for a, b in to_check if a in texts and b in texts)
    right += justified
    return {
        "recall": round(len(found) / max(1, len(truth.pairs)), 4),
        "precision": round(right / len(removed), 4) if removed else 1.0,
        "pairs": len(truth.pairs), "pairs_found": len(found),
        "pairs_both_removed": sum(p["copy_id"] in removed and p["original_id"] in removed for p in truth.pairs),
        "removed": len(removed), "removed_right": right, "removed_outside_pairs": len(to_check),
        "removed_outside_pairs_jaccard_ge_0_7": justified, "removed_without_known_match": unknown_match,
        **{f"recall_by_{kind}": {k: round(v[0] / v[1], 4) for k, v in sorted(values.items())}
           for kind, values in by.items()},
        "pairs_by_recipe": {k: v[1] for k, v in sorted(by["recipe"].items())},
    }


# ------------------------------------------------------------------------------------------------------------
# Genesis's outputs


def _read_text_column(path: Path):
    import pyarrow as pa

    try:
        table = pa.ipc.open_file(str(path)).read_all()
    except pa.ArrowInvalid:
        with pa.memory_map(str(path), "r") as source:
            table = pa.ipc.open_stream(source).read_all()
    return table.column("text")


def genesis_removals(truth: Truth, out_dir: Path) -> tuple[dict[str, str | None], dict]:
    """Genesis's removed documents (by corpus id) → the id it kept instead, from dedup/removed.parquet (source,
    part, row, kind, kept_source, kept_part, kept_row) and the clean parts its rows point into
    (clean/<source>/<part>.arrow hold every cleaned document, removed ones included)."""
    import pyarrow.parquet as pq

    removed_file = out_dir / "dedup" / "removed.parquet"
    info: dict = {}
    clean = out_dir / "clean"
    if not removed_file.is_file():
        raise FileNotFoundError(f"{removed_file}: the stage wrote no removal list; nothing to score")
    table = pq.read_table(removed_file)
    rows = table.to_pylist()
    info["removed_from"] = "dedup/removed.parquet"
    info["removed_by_kind"] = {k: sum(r["kind"] == k for r in rows) for k in sorted({r["kind"] for r in rows})}
    wanted: dict[tuple[str, str], set[int]] = defaultdict(set)
    for row in rows:
        wanted[(row["source"], row["part"])].add(row["row"])
        wanted[(row["kept_source"], row["kept_part"])].add(row["kept_row"])
    resolved: dict[tuple[str, str, int], str | None] = {}
    for (source, part), wanted_rows in wanted.items():
        column = _read_text_column(clean / source / f"{part}.arrow")
        for row in wanted_rows:
            resolved[(source, part, row)] = truth.key_to_id.get(scale_corpus.text_key(column[row].as_py()))
    removed: dict[str, str | None] = {}
    unresolved = 0
    for row in rows:
        doc = resolved[(row["source"], row["part"], row["row"])]
        kept = resolved[(row["kept_source"], row["kept_part"], row["kept_row"])]
        if doc is None:
            unresolved += 1
            continue
        removed[doc] = kept
    info["unresolved_rows"] = unresolved
    return removed, info


def genesis_survivor_texts(out_dir: Path, removed_rows: set[tuple[str, str, int]], sample_bytes: float) -> tuple[list[str], int]:
    """A sample of the documents Genesis tokenized in the corpus's own mix, and the bytes of them all: every part
    gives its first surviving documents up to the same share of its bytes. NOTE: SentencePiece's speed differs
    several-fold between sources (books and textbooks are the slowest here), so an anchor sampled round-robin
    (an equal share per source) was faster than the text the stage tokenized, and the stage looked slower."""
    import pyarrow.compute as pc

    parts = [(d.name, part) for d in sorted((out_dir / "clean").iterdir()) if d.is_dir()
             for part in sorted(d.glob("*.arrow"))]
    gone_by_part: dict[tuple[str, str], set[int]] = defaultdict(set)
    for source, part, row in removed_rows:
        gone_by_part[(source, part)].add(row)
    survivors = []  # per part: (row, bytes) of each surviving document
    for source, part in parts:
        lengths = pc.binary_length(pc.cast(_read_text_column(part), "large_binary")).to_pylist()
        gone = gone_by_part.get((source, part.stem), set())
        survivors.append([(row, n) for row, n in enumerate(lengths) if row not in gone])
    total = sum(n for rows in survivors for _, n in rows)
    share = min(1.0, sample_bytes / total) if total else 0.0
    sample: list[str] = []
    for (_, part), rows in zip(parts, survivors):
        quota, taken, wanted = share * sum(n for _, n in rows), 0, []
        for row, n in rows:
            if taken >= quota:
                break
            wanted.append(row)
            taken += n
        if wanted:
            column = _read_text_column(part)
            sample += column.take(wanted).to_pylist()
    return sample, total


# ------------------------------------------------------------------------------------------------------------
# SentencePiece anchor

_SPM_TEXTS: list[str] = []
_SPM_MODEL = ""


def _spm_encode(indices: range) -> float:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=_SPM_MODEL)
    texts = [_SPM_TEXTS[i] for i in indices]
    started = time.perf_counter()
    for start in range(0, len(texts), 512):
        sp.encode(texts[start:start + 512], num_threads=1)
    return time.perf_counter() - started


def spm_anchor(model: Path, texts: list[str]) -> dict:
    """Raw SentencePiece encode (one thread per process) of `texts`: one process, then two processes each
    encoding half; MB/s per process and the 2-process scaling."""
    global _SPM_TEXTS, _SPM_MODEL
    _SPM_TEXTS, _SPM_MODEL = texts, str(model)
    mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    before = host_contention()
    one = _spm_encode(range(len(texts)))
    context = multiprocessing.get_context("fork")
    with context.Pool(2) as pool:
        pool.map(len, [[], []])  # both processes are up before the clock starts
        started = time.perf_counter()
        pool.map(_spm_encode, [range(0, len(texts), 2), range(1, len(texts), 2)])
        two = time.perf_counter() - started
    _SPM_TEXTS = []
    scaling = one / two
    return {"sample_mb": round(mb, 1), "docs": len(texts), "mb_s_1proc": round(mb / one, 3),
            "mb_s_2proc_total": round(mb / two, 3), "scaling_2proc": round(scaling, 3),
            "baseline_disturbed": scaling > 2.0, "host_before": before, "host_after": host_contention()}


# ------------------------------------------------------------------------------------------------------------
# One size


def run_genesis(root: Path, out_dir: Path, workers: int, args, log_dir: Path) -> dict:
    shutil.rmtree(out_dir, ignore_errors=True)
    command = [str(args.genesis), "data", "prepare", "--corpus", str(root / "corpus.yaml"), "--out", str(out_dir),
               f"executor={args.executor}", f"workers={workers}"]
    if args.dask_address:
        command.append(f"dask_address={args.dask_address}")
    command += args.genesis_override
    print(f"genesis: {' '.join(command)}", flush=True)
    result = run_measured(command, log_dir / f"{out_dir.name}.log", timeout=args.run_timeout)
    report = out_dir / "report.json"
    if report.is_file():
        data = json.loads(report.read_text())
        result["timings"] = data.get("_timings")
        result["dedup_totals"] = data.get("_dedup_totals")
        # Per phase, the workers' largest resident memory when a job started and the peak so far when one ended:
        # which phase sets a worker's peak, and whether by what a job holds or what the process kept.
        result["jobs_rss"] = data.get("_jobs")
        sources = [v for k, v in data.items() if not k.startswith("_") and isinstance(v, dict)]
        result["docs_clean"] = sum(v.get("docs_clean", 0) for v in sources)  # = the corpus's docs: nothing filtered
        result["docs_out"] = sum(v.get("docs_out", 0) for v in sources)
    manifest = out_dir / "manifest.json"
    if manifest.is_file():
        sources = json.loads(manifest.read_text()).get("sources", [])
        result["tokens"] = sum(shard.get("num_tokens", 0) for s in sources for shard in s.get("shards", []))
    result["workers"] = workers
    print(f"genesis: rc {result['rc']}, {result['wall_s']} s, driver {result['driver_peak_rss_gib']} GiB, "
          f"max worker {result['max_worker_peak_rss_gib']} GiB, timings {result.get('timings')}", flush=True)
    return result


def per_core(docs: int, seconds: float | None, workers: int) -> float | None:
    return round(docs / (seconds * workers), 1) if seconds and seconds > 0 else None


def run_size(size: float, args, middle: bool, log_dir: Path, with_datatrove: bool = True,
             one_worker: bool | None = None) -> dict:
    """One corpus size. `middle`: the SentencePiece anchor runs here; `one_worker` (default: `middle`): the same
    prepare with 1 worker too; `with_datatrove`: datatrove runs here."""
    one_worker = middle if one_worker is None else one_worker
    root = scale_corpus.build(size, args.work, args.seed, args.plant_fraction, args.compression, args.build_processes,
                              file_mb=args.file_mb)
    built = scale_corpus.read_info(root)
    truth = Truth(root)
    gb = built["text_bytes"] / 1e9
    record: dict = {"size_gb_requested": size, "size_gb": round(gb, 4),
                    "corpus": {k: built[k] for k in ("docs", "text_bytes", "file_bytes", "files", "planted_pairs",
                                                     "pairs_by_recipe", "duplicate_keys", "build_s")}}
    tokenizer_json = args.datatrove_tokenizer
    workers = args.workers
    if not args.skip_genesis:
        out = args.work / f"genesis-{size:g}gb-w{workers}"
        genesis = run_genesis(root, out, workers, args, log_dir)
        training = (genesis.get("timings") or {}).get("tokenizer")
        genesis["seconds_per_gb"] = round(genesis["wall_s"] / gb, 2)
        genesis["seconds_per_gb_excl_tokenizer_training"] = round((genesis["wall_s"] - (training or 0)) / gb, 2)
        genesis["tokenizer_training_s"] = training
        if genesis["rc"] == 0:
            genesis["docs_per_core_s"] = per_core(truth.docs, genesis["wall_s"] - (training or 0), workers)
            genesis["docs_per_core_s_incl_tokenizer_training"] = per_core(truth.docs, genesis["wall_s"], workers)
            genesis["docs_per_cpu_s"] = round(truth.docs / genesis["cpu_s"], 1) if genesis["cpu_s"] else None
            if args.skip_scoring or args.score_at not in (None, size):
                genesis["quality"] = {"skipped": "--skip-scoring" if args.skip_scoring else f"--score-at {args.score_at:g}"}
            else:
                try:
                    removed, info = genesis_removals(truth, out)
                    genesis["quality"] = {**score(truth, removed, truth.texts), **info}
                    print(f"genesis: recall {genesis['quality']['recall']}, precision "
                          f"{genesis['quality']['precision']}", flush=True)
                except (FileNotFoundError, KeyError, IndexError) as err:
                    genesis["quality"] = {"error": f"{type(err).__name__}: {err}"}
            if middle and not args.skip_spm:
                import pyarrow.parquet as pq

                removed_rows = set()
                if (out / "dedup" / "removed.parquet").is_file():
                    removed_rows = {(r["source"], r["part"], r["row"])
                                    for r in pq.read_table(out / "dedup" / "removed.parquet").to_pylist()}
                sample, survivor_bytes = genesis_survivor_texts(out, removed_rows, args.spm_sample_mb * 1e6)
                anchor = spm_anchor(out / "tokenizer" / "tokenizer.model", sample)
                del sample
                tokenize_s = (genesis.get("timings") or {}).get("tokenize")
                stage = survivor_bytes / 1e6 / tokenize_s / workers if tokenize_s else None
                record["tokenize_vs_spm"] = {
                    **anchor, "stage_tokenize_s": tokenize_s, "stage_tokenized_mb": round(survivor_bytes / 1e6, 1),
                    "stage_mb_s_per_process": round(stage, 3) if stage else None,
                    "stage_vs_spm_per_process": round(stage / anchor["mb_s_1proc"], 3) if stage else None,
                    "workers": workers}
                print(f"tokenize vs spm: {record['tokenize_vs_spm']}", flush=True)
            if (out / "tokenizer" / "tokenizer.json").is_file():
                tokenizer_json = args.work / f"tokenizer-{size:g}gb.json"
                shutil.copyfile(out / "tokenizer" / "tokenizer.json", tokenizer_json)
        record["genesis"] = genesis
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
        if one_worker and workers != 1:
            out1 = args.work / f"genesis-{size:g}gb-w1"
            one = run_genesis(root, out1, 1, args, log_dir)
            one["seconds_per_gb"] = round(one["wall_s"] / gb, 2)
            record["genesis_1_worker"] = one
            if one["rc"] == 0 and genesis["rc"] == 0:
                record["dask_2_vs_1"] = round(one["wall_s"] / genesis["wall_s"], 3)
                one_training = (one.get("timings") or {}).get("tokenizer") or 0
                record["dask_2_vs_1_excl_tokenizer_training"] = _ratio(one["wall_s"] - one_training,
                                                                       genesis["wall_s"] - (training or 0))
            if not args.keep:
                shutil.rmtree(out1, ignore_errors=True)
    if not with_datatrove:
        record["datatrove"] = {"skipped": f"datatrove runs at {args.datatrove_at:g} GB"}
    elif not args.skip_datatrove:
        if not tokenizer_json or not Path(tokenizer_json).is_file():
            record["datatrove"] = {"skipped": "no tokenizer.json (Genesis's run failed and no --datatrove-tokenizer)"}
        else:
            work = args.work / f"datatrove-{size:g}gb-w{workers}"
            command = [str(args.datatrove_python), str(REPO / "bench" / "datatrove_run.py"), "pipeline",
                       "--input", str(root / "sources"), "--work", str(work), "--workers", str(workers),
                       "--tokenizer", str(tokenizer_json), "--result", str(work) + ".result.json"]
            if args.datatrove_tasks:
                command += ["--tasks", str(args.datatrove_tasks)]
            print(f"datatrove: {' '.join(command)}", flush=True)
            datatrove = run_measured(command, log_dir / f"{work.name}.log",
                                     env={"TOKENIZERS_PARALLELISM": "false", "RAYON_NUM_THREADS": "1"},
                                     timeout=args.run_timeout)
            datatrove["workers"] = workers
            datatrove["seconds_per_gb"] = round(datatrove["wall_s"] / gb, 2)
            if datatrove["rc"] == 0:
                result = json.loads(Path(str(work) + ".result.json").read_text())
                datatrove.update({k: result[k] for k in ("timings", "seconds", "tasks", "tokens", "step_counts",
                                                         "minhash", "datatrove")})
                datatrove["docs_per_core_s"] = per_core(truth.docs, datatrove["wall_s"], workers)
                datatrove["docs_per_cpu_s"] = round(truth.docs / datatrove["cpu_s"], 1) if datatrove["cpu_s"] else None
                clusters: dict[int, list[dict]] = defaultdict(list)
                for line in open(result["clusters_file"], encoding="utf-8"):
                    entry = json.loads(line)
                    clusters[entry["cluster"]].append(entry)
                removed: dict[str, str | None] = {}
                for members in clusters.values():
                    kept = [m["id"] for m in members if not m["removed"]]
                    for member in members:
                        if member["removed"]:
                            removed[member["id"]] = kept[0] if kept else None
                datatrove["quality"] = score(truth, removed, truth.texts)
                print(f"datatrove: {datatrove['wall_s']} s, recall {datatrove['quality']['recall']}, precision "
                      f"{datatrove['quality']['precision']}", flush=True)
            record["datatrove"] = datatrove
            g_timings = (record.get("genesis") or {}).get("timings") or {}
            d_timings = datatrove.get("timings") or {}
            if g_timings and d_timings:
                # seconds per like step, Genesis vs datatrove (both with `workers` processes)
                record["stage_seconds_genesis_vs_datatrove"] = {
                    "read_clean_signatures": [g_timings.get("read_clean"), d_timings.get("signatures")],
                    "dedup_buckets_clusters": [g_timings.get("dedup"),
                                               round(d_timings.get("buckets", 0) + d_timings.get("cluster", 0), 3)],
                    "tokenize": [g_timings.get("tokenize"), d_timings.get("filter_tokenize")],
                    "tokenizer_training": [g_timings.get("tokenizer"), None]}
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)
    return record


# ------------------------------------------------------------------------------------------------------------


def describe_host(host: dict) -> str:
    return f"{host.get('cpu_count')} cores, {host.get('memory_gib')} GiB, load {host.get('loadavg')}"


def _ratio(a, b):
    return round(a / b, 3) if a is not None and b else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[0.25, 1, 4], help="corpus sizes in GB (10⁹ bytes of text)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "genesis-data-scale",
                        help="corpora (kept and reused) and run outputs (removed after scoring unless --keep)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "data_scale.json")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plant-fraction", type=float, default=0.05)
    parser.add_argument("--compression", choices=("mixed", "gzip", "none"), default="mixed")
    parser.add_argument("--build-processes", type=int, default=None)
    parser.add_argument("--file-mb", type=float, default=None,
                        help="every corpus file this size at every corpus size (default: about size/48, so the "
                             "files, and with them the stage's parts, grow with the corpus)")
    parser.add_argument("--genesis", type=Path, default=GENESIS if GENESIS.is_file() else Path(shutil.which("genesis") or GENESIS),
                        help="the genesis command (default: the repo's .venv, else PATH)")
    parser.add_argument("--executor", choices=("dask", "serial"), default="dask")
    parser.add_argument("--dask-address", default=None,
                        help="an existing Dask scheduler (its workers are not under this process: no worker RSS)")
    parser.add_argument("--genesis-override", action="append", default=[], help="extra dotted override, repeatable")
    parser.add_argument("--spm-sample-mb", type=float, default=256.0)
    parser.add_argument("--skip-genesis", action="store_true", help="corpus + datatrove only (needs --datatrove-tokenizer)")
    parser.add_argument("--skip-datatrove", action="store_true")
    parser.add_argument("--skip-scoring", action="store_true",
                        help="no recall/precision for Genesis (scoring reads every planted document back: minutes "
                             "at 4 GB); for runs that measure memory and time only")
    parser.add_argument("--score-at", type=float, default=None, help="score Genesis's removals at this size only")
    parser.add_argument("--figures", nargs="+", default=None,
                        help="the top-level figures this run sets (default: all it measured); e.g. a run of "
                             "--sizes 1 --skip-datatrove --figures dask_2_vs_1 leaves the scale figures alone")
    parser.add_argument("--datatrove-at", type=float, default=None,
                        help="the one size datatrove runs at (default: every size); the comparison is read there")
    parser.add_argument("--one-worker-at", type=float, default=None,
                        help="the size at which the 1-worker prepare runs for dask_2_vs_1 (default: the middle "
                             "size; 0: none)")
    parser.add_argument("--datatrove-largest-only", action="store_true",
                        help="run datatrove at the largest size only (where vs_datatrove and its recall are read)")
    parser.add_argument("--skip-spm", action="store_true")
    parser.add_argument("--datatrove-python", type=Path, default=DATATROVE_PYTHON)
    parser.add_argument("--datatrove-tokenizer", type=Path, default=None,
                        help="tokenizer.json for datatrove when Genesis does not run (default: Genesis's, per size)")
    parser.add_argument("--datatrove-tasks", type=int, default=0, help="default: one task per input file")
    parser.add_argument("--run-timeout", type=float, default=None, help="seconds per prepare / datatrove run")
    parser.add_argument("--keep", action="store_true", help="keep Genesis's and datatrove's output directories")
    args = parser.parse_args()
    if not args.skip_datatrove and not args.datatrove_python.is_file():
        parser.error(f"{args.datatrove_python} missing: python3.11 -m venv bench/.venv-datatrove && "
                     f"bench/.venv-datatrove/bin/pip install -r bench/requirements-datatrove.txt")
    args.work.mkdir(parents=True, exist_ok=True)
    log_dir = args.work / "logs"
    log_dir.mkdir(exist_ok=True)
    sizes = sorted(args.sizes)
    middle = sizes[len(sizes) // 2]
    if args.datatrove_largest_only:
        args.datatrove_at = sizes[-1]
    one_worker_at = middle if args.one_worker_at is None else args.one_worker_at
    host_start = host_contention()
    run: dict = {**environment(), "git_rev": git_rev(), "git_dirty": git_dirty(("data_prep", "cli", "genesis")),
                 "command": " ".join(["python", *sys.argv]),
                 "host": host_start, "workers": args.workers, "executor": args.executor, "seed": args.seed,
                 "plant_fraction": args.plant_fraction, "sizes": {}}
    started = time.perf_counter()
    for size in sizes:
        run["sizes"][f"{size:g}"] = run_size(size, args, size == middle, log_dir,
                                             with_datatrove=args.datatrove_at in (None, size),
                                             one_worker=size == one_worker_at)
    run["host_end"] = host_contention()
    run["bench_s"] = round(time.perf_counter() - started, 1)

    per_size = run["sizes"]
    small, large, mid = f"{sizes[0]:g}", f"{sizes[-1]:g}", f"{middle:g}"
    ok = {k: v for k, v in per_size.items() if v.get("genesis", {}).get("rc") == 0}

    def rss(key: str, field: str):
        return ok[key]["genesis"][field] if key in ok else None

    peak_rss = {k: {"driver": v["genesis"]["driver_peak_rss_gib"], "max_worker": v["genesis"]["max_worker_peak_rss_gib"],
                    "tree": v["genesis"]["tree_peak_rss_gib"]} for k, v in ok.items()}
    # throughput and quality against datatrove: at the size datatrove ran (the largest when it ran at every size)
    compared = f"{args.datatrove_at:g}" if args.datatrove_at is not None else large
    genesis_large = ok.get(compared, {}).get("genesis", {})
    datatrove_large = per_size.get(compared, {}).get("datatrove", {})
    two_vs_one = f"{one_worker_at:g}"
    latest = {
        "sizes_gb": [per_size[f"{s:g}"]["size_gb"] for s in sizes],
        "peak_rss_gib": peak_rss,
        "rss_growth": {field: _ratio(rss(large, f"{field}_peak_rss_gib"), rss(small, f"{field}_peak_rss_gib"))
                       for field in ("driver", "max_worker", "tree")},
        "time_per_gb_growth": _ratio(rss(large, "seconds_per_gb"), rss(small, "seconds_per_gb")),
        # the tokenizer's training is a fixed cost (a bounded sample), which alone makes seconds/GB fall with size
        "time_per_gb_growth_excl_tokenizer_training": _ratio(rss(large, "seconds_per_gb_excl_tokenizer_training"),
                                                             rss(small, "seconds_per_gb_excl_tokenizer_training")),
        "dask_2_vs_1": per_size.get(two_vs_one, {}).get("dask_2_vs_1"),
        "dask_2_vs_1_excl_tokenizer_training": per_size.get(two_vs_one, {}).get("dask_2_vs_1_excl_tokenizer_training"),
        "docs_per_core_s": genesis_large.get("docs_per_core_s"),
        "datatrove_docs_per_core_s": datatrove_large.get("docs_per_core_s"),
        "vs_datatrove": _ratio(genesis_large.get("docs_per_core_s"), datatrove_large.get("docs_per_core_s")),
        "recall": genesis_large.get("quality", {}).get("recall"),
        "precision": genesis_large.get("quality", {}).get("precision"),
        "datatrove_recall": datatrove_large.get("quality", {}).get("recall"),
        "datatrove_precision": datatrove_large.get("quality", {}).get("precision"),
        "tokenize_vs_spm": {k: per_size.get(mid, {}).get("tokenize_vs_spm", {}).get(k)
                            for k in ("stage_vs_spm_per_process", "mb_s_1proc", "stage_mb_s_per_process",
                                      "scaling_2proc", "baseline_disturbed")},
        "figures_at_gb": {"throughput_and_quality": float(compared), "dask_2_vs_1": one_worker_at or None,
                          "tokenize": middle},
        "workers": args.workers,
        "cpu_count": host_start["cpu_count"],
        "loadavg_start": host_start["loadavg"],
        "loadavg_end": run["host_end"]["loadavg"],
        "command": run["command"],
        "git_rev": run["git_rev"],
    }
    # A run that measured only some figures (e.g. dask_2_vs_1 alone, on another machine) leaves the others as the
    # earlier run measured them; `figure_runs` says which run (date, host, command) each top-level figure is from.
    latest = {k: v for k, v in latest.items() if v is not None and v != {} and not
              (isinstance(v, dict) and all(x is None for x in v.values()))
              and (not args.figures or k in args.figures or k in ("command", "git_rev"))}
    earlier = json.loads(args.out.read_text()) if args.out.is_file() else {}
    origin = f"{run['date']} · {describe_host(host_start)} · {run['command']}"
    latest["figure_runs"] = {**earlier.get("figure_runs", {}),
                             **{k: origin for k in latest if k not in ("command", "git_rev", "workers", "cpu_count",
                                                                       "loadavg_start", "loadavg_end")}}
    append_run(args.out, run, latest)
    print(json.dumps(latest, indent=1))


if __name__ == "__main__":
    main()
