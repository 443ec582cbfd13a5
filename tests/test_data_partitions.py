"""Specifications of the data stage at corpus scale: partitioned jobs, dedup across sources and parts from disk,
resumable after a kill, the same on one process and on a Dask cluster, and honest about budgets and repetition."""

from __future__ import annotations

import gzip
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from data_prep.pipeline import prepare, tokenizer_sample
from data_prep.sources import CorpusConfig
from genesis.errors import DataError
from genesis.manifest import read_manifest, verify_data_dir
from tests.conftest import REPO, SHARED

DATA = SHARED / "data"
GENESIS = [sys.executable, "-m", "cli.main"]


def kit_texts(name: str) -> list[str]:
    with gzip.open(DATA / "pretrain" / name, "rt", encoding="utf-8") as handle:
        return [json.loads(line)["text"] for line in handle]


def edited(text: str, rng: random.Random, fraction: float = 0.03) -> str:
    """A near-duplicate: a few words replaced."""
    words = text.split(" ")
    for position in rng.sample(range(len(words)), max(1, int(len(words) * fraction))):
        words[position] = "changed"
    return " ".join(words)


def write_jsonl(path: Path, texts: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> dict:
    """Two sources of several files each; near-duplicates planted across files and across sources."""
    root = tmp_path_factory.mktemp("planted")
    rng = random.Random(7)
    web = [t for t in kit_texts("c4_web_sample.jsonl.gz") if len(t.split()) > 80]
    books = [t for t in kit_texts("openstax_textbooks.jsonl.gz") if len(t.split()) > 80][:200]
    originals = web[:12]
    copies_in_web = [edited(t, rng) for t in originals[:6]]       # across files of one source
    copies_in_books = [edited(t, rng) for t in originals[6:12]]   # across sources
    web_files = [web[0:100], web[100:] + copies_in_web]
    book_files = [books[:100] + copies_in_books, books[100:]]
    for number, texts in enumerate(web_files):
        write_jsonl(root / "web" / f"part{number}.jsonl", texts)
    for number, texts in enumerate(book_files):
        write_jsonl(root / "books" / f"part{number}.jsonl", texts)
    return {"root": root, "copies_in_web": copies_in_web, "copies_in_books": copies_in_books,
            "docs": sum(len(t) for t in web_files + book_files)}


@pytest.fixture(scope="module")
def planted_serial(planted, tmp_path_factory) -> tuple[Path, object]:
    """The planted corpus prepared once in one process (the default settings): its data directory and manifest,
    which the tests that only read it, or compare another way of preparing against it, share."""
    data_dir = tmp_path_factory.mktemp("planted_serial") / "data"
    return data_dir, prepare(planted_corpus(planted["root"]), data_dir)


def planted_corpus(root: Path, **fields) -> CorpusConfig:
    data = {"name": "planted", "docs_per_shard": 40, "executor": "serial", "dedup_shuffle_rows": 50,
            "tokenizer": {"vocab_size": 1024, "sample_sentences": 4000},
            "sources": [{"name": "web", "kind": "local", "paths": [str(root / "web" / "*.jsonl")], "weight": 0.7},
                        {"name": "books", "kind": "local", "paths": [str(root / "books" / "*.jsonl")], "weight": 0.3}]}
    for key, value in fields.items():
        data[key] = value
    return CorpusConfig.model_validate(data)


def manifest_bytes(data_dir: Path) -> dict[str, bytes]:
    manifest = read_manifest(data_dir)
    return {shard.path: (data_dir / shard.path).read_bytes() for source in manifest.sources for shard in source.shards}


# ---------------------------------------------------------------------------------------------------------------
# Dedup across sources and partitions, from disk


def test_near_duplicates_planted_across_files_and_across_sources_are_removed_from_the_later_one(planted_serial):
    data_dir, _ = planted_serial
    removed = pq.read_table(data_dir / "dedup" / "removed.parquet").to_pylist()
    near = [row for row in removed if row["kind"] == "near"]
    assert sum(row["source"] == "web" and row["kept_source"] == "web" for row in near) >= 5
    assert sum(row["source"] == "books" and row["kept_source"] == "web" for row in near) >= 5
    report = json.loads((data_dir / "report.json").read_text())
    assert report["books"]["near_duplicates_removed"] >= 5
    assert report["books"]["duplicate_examples"][0]["kept_source"] == "web"
    # Every removed document's kept twin is a document that survived, in an earlier position.
    assert all((row["kept_source"], row["kept_part"], row["kept_row"]) < (row["source"], row["part"], row["row"])
               or row["kept_source"] == "web" and row["source"] == "books" for row in removed)
    assert report["_dedup_totals"]["hash_ranges"] > 1  # the band keys really were split into hash ranges


def test_a_two_worker_dask_local_cluster_and_one_process_write_identical_manifests_and_removal_lists(
        planted, planted_serial, tmp_path):
    one_dir, one = planted_serial
    two = prepare(planted_corpus(planted["root"], executor="dask", workers=2), tmp_path / "two")
    assert one == two
    assert manifest_bytes(one_dir) == manifest_bytes(tmp_path / "two")
    assert (one_dir / "dedup" / "removed.parquet").read_bytes() == \
        (tmp_path / "two" / "dedup" / "removed.parquet").read_bytes()


def test_a_dialogue_that_repeats_a_pretraining_document_is_a_duplicate_across_sources(tmp_path):
    """GSM8K's test problems as pretraining text and as SFT dialogues: dedup compares the dialogue's turns, not its
    chat markup, so every dialogue is found as the pretraining document it repeats."""
    corpus = CorpusConfig.model_validate({
        "name": "gsm8k-twice", "executor": "serial", "docs_per_shard": 200,
        "tokenizer": {"vocab_size": 1024, "sample_sentences": 3000},
        "sources": [{"name": "math", "kind": "local", "paths": [str(DATA / "pretrain" / "gsm8k.test.jsonl.gz")],
                     "weight": 0.5, "max_docs": 300},
                    {"name": "chat", "kind": "local", "format": "chat", "weight": 0.5, "max_docs": 300,
                     "paths": [str(DATA / "sft" / "gsm8k.test.jsonl.gz")]}]})
    from data_prep.pipeline import stage_clean

    report = stage_clean(corpus, tmp_path / "data")
    removed = report["chat"]["exact_duplicates_removed"] + report["chat"]["near_duplicates_removed"]
    assert removed >= 0.95 * report["chat"]["docs_clean"]
    assert report["math"]["docs_out"] == report["math"]["docs_clean"]
    assert {example["kept_source"] for example in report["chat"]["duplicate_examples"]} == {"math"}


def test_an_existing_dask_cluster_named_by_its_scheduler_address_runs_the_stage(planted, planted_serial, tmp_path):
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        on_cluster = prepare(planted_corpus(planted["root"], executor="dask", dask_address=cluster.scheduler_address),
                             tmp_path / "cluster")
    assert on_cluster == planted_serial[1]


# ---------------------------------------------------------------------------------------------------------------
# Killed and rerun


def write_corpus_yaml(path: Path, corpus: CorpusConfig) -> Path:
    path.write_text(yaml.safe_dump(corpus.model_dump(mode="json")))
    return path


@pytest.mark.slow
def test_a_prepare_killed_during_dedup_redoes_only_unfinished_jobs_and_writes_byte_identical_shards(planted, tmp_path):
    # Small hash ranges make hundreds of bucket jobs, so the kill lands between them.
    corpus = planted_corpus(planted["root"], dedup_shuffle_rows=5)
    config = write_corpus_yaml(tmp_path / "corpus.yaml", corpus)
    reference = tmp_path / "reference"
    prepare(corpus, reference)

    data_dir = tmp_path / "killed"
    buckets = data_dir / "dedup" / "buckets"
    total = len(list((reference / "dedup" / "buckets").glob("*.npy")))
    process = subprocess.Popen([*GENESIS, "data", "prepare", "--corpus", str(config), "--out", str(data_dir)],
                               cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        done = len(list(buckets.glob("*.npy"))) if buckets.is_dir() else 0
        if done >= 5:
            os.killpg(process.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the kill did not land inside the dedup stage"
    finished = {path.name: path.stat().st_mtime_ns for path in buckets.glob("*.npy")}
    assert 5 <= len(finished) < total
    assert not (data_dir / "manifest.json").exists()

    rerun = subprocess.run([*GENESIS, "data", "prepare", "--corpus", str(config), "--out", str(data_dir)],
                           cwd=REPO, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert {path.name: path.stat().st_mtime_ns for path in buckets.glob("*.npy") if path.name in finished} == finished
    jobs = json.loads((data_dir / "report.json").read_text())["_jobs"]
    assert jobs["read + clean"]["skipped"] == jobs["read + clean"]["total"]  # every read unit had finished
    assert jobs["dedup: buckets"]["skipped"] == len(finished)
    assert jobs["dedup: buckets"]["run"] == total - len(finished)
    assert manifest_bytes(data_dir) == manifest_bytes(reference)
    assert (data_dir / "manifest.json").read_bytes() == (reference / "manifest.json").read_bytes()


def test_a_dedup_resumed_with_another_verification_chunk_size_does_not_reuse_the_other_size_s_chunks(planted, tmp_path):
    # A run killed during verification left chunks of 3 pairs; its rerun cuts the candidates in chunks of 2.
    reference = tmp_path / "reference"
    prepare(planted_corpus(planted["root"], dedup_verify_pairs=2), reference)
    data_dir = tmp_path / "data"
    prepare(planted_corpus(planted["root"], dedup_verify_pairs=3), data_dir)
    assert len(list((data_dir / "dedup" / "verified").glob("*.npy"))) > 1
    (data_dir / ".stages" / "clean.json").unlink()  # as if killed before the stage finished
    (data_dir / "dedup" / "removed.parquet").unlink()

    prepare(planted_corpus(planted["root"], dedup_verify_pairs=2), data_dir)

    assert (data_dir / "dedup" / "removed.parquet").read_bytes() == (reference / "dedup" / "removed.parquet").read_bytes()
    assert manifest_bytes(data_dir) == manifest_bytes(reference)
    assert sorted(path.name for path in (data_dir / "dedup" / "verified").glob("*.npy")) == \
        sorted(path.name for path in (reference / "dedup" / "verified").glob("*.npy"))


def test_a_shard_that_verify_finds_corrupt_is_rebuilt_by_the_next_prepare(planted, tmp_path):
    corpus = planted_corpus(planted["root"])
    prepare(corpus, tmp_path / "data")
    original = manifest_bytes(tmp_path / "data")
    victim = tmp_path / "data" / next(iter(original))
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(DataError, match="checksum|sha256"):
        verify_data_dir(tmp_path / "data")
    prepare(corpus, tmp_path / "data")
    verify_data_dir(tmp_path / "data")
    assert manifest_bytes(tmp_path / "data") == original


def test_a_source_file_changed_since_the_last_run_is_read_again_and_the_others_are_not(planted, tmp_path):
    root = tmp_path / "sources"
    for path in planted["root"].rglob("*.jsonl"):
        (root / path.relative_to(planted["root"])).parent.mkdir(parents=True, exist_ok=True)
        (root / path.relative_to(planted["root"])).write_bytes(path.read_bytes())
    first = prepare(planted_corpus(root), tmp_path / "data")
    changed = root / "books" / "part1.jsonl"
    with changed.open("a") as handle:
        handle.write(json.dumps({"text": "A brand new document about tide pools. " * 20}) + "\n")
    second = prepare(planted_corpus(root), tmp_path / "data")
    assert second.sources[1].num_docs == first.sources[1].num_docs + 1
    jobs = json.loads((tmp_path / "data" / "report.json").read_text())["_jobs"]["read + clean"]
    assert (jobs["run"], jobs["skipped"]) == (1, 3)
    assert 0 < jobs["peak_rss_gib"] < 24  # the largest peak memory of a process that ran one of its jobs
    assert 0 < jobs["start_rss_gib"] <= jobs["peak_rss_gib"]  # the most memory a job of the phase started from


def test_a_moved_data_directory_is_prepared_again_without_redoing_anything(planted, tmp_path):
    corpus = planted_corpus(planted["root"])
    first = prepare(corpus, tmp_path / "data")
    (tmp_path / "data").rename(tmp_path / "moved")
    again = prepare(corpus, tmp_path / "moved")
    assert again == first
    verify_data_dir(tmp_path / "moved")


def test_in_shards_a_web_page_quoting_chat_markers_is_text_and_a_dialogue_s_markers_are_marker_ids(planted, tmp_path):
    from genesis.chat import CHAT_TOKENS, EOS
    from genesis.manifest import ShardReader

    quoting = ("A forum post about prompt formats: a ChatML turn starts with <|im_start|> and ends with <|im_end|>; "
               "tools go in <tools></tools>, calls in <tool_call></tool_call>, and the end of text is " + EOS + ". ") * 3
    (tmp_path / "web.jsonl").write_text(json.dumps({"text": quoting}) + "\n")
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": [
        {"role": "user", "content": "Why is the sky blue, and what does <|im_end|> mean?"},
        {"role": "assistant", "content": "Rayleigh scattering favours short wavelengths, so blue light reaches you "
                                         "from every direction of the sky."}]}) + "\n")
    corpus = CorpusConfig.model_validate({
        "name": "markers", "executor": "serial", "tokenizer": {"vocab_size": 1024, "sample_sentences": 3000},
        "sources": [{"name": "web", "kind": "local", "paths": [str(tmp_path / "web.jsonl")], "weight": 0.5},
                    {"name": "chat", "kind": "local", "format": "chat", "paths": [str(tmp_path / "chat.jsonl")],
                     "weight": 0.5},
                    {"name": "filler", "kind": "local", "paths": [str(planted["root"] / "web" / "part0.jsonl")],
                     "weight": 0.5}]})
    manifest = prepare(corpus, tmp_path / "data")
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "data" / "tokenizer" / "tokenizer.model"))
    marker_ids = {sp.piece_to_id(marker) for marker in CHAT_TOKENS} | {sp.eos_id()}
    web, chat = (ShardReader(tmp_path / "data" / s.shards[0].path).doc(0).tolist() for s in manifest.sources[:2])
    assert not marker_ids & set(web[:-1])  # only the EOS that ends the document
    assert sp.decode(web[:-1]) == quoting
    im_start, im_end = sp.piece_to_id("<|im_start|>"), sp.piece_to_id("<|im_end|>")
    assert chat.count(im_start) == 2 and chat.count(im_end) == 2  # the template's, not the one the user quoted
    assert "<|im_end|> mean?" in sp.decode([i for i in chat if i not in marker_ids])


def test_a_tokenize_job_encodes_a_bounded_amount_of_text_at_a_time_and_the_shard_does_not_depend_on_it(
        planted_serial, tmp_path, monkeypatch):
    """An encode call's ids are Python ints (36 bytes a token) until copied into arrays: a job bounds each call's
    text in bytes as well as in documents, so a part of long documents is never encoded, and held, whole (a
    worker's peak followed the longest part it met). The shard is the same whatever the batches."""
    import data_prep.shards as shards

    data_dir, _ = planted_serial  # read only: its clean parts and tokenizer
    part = sorted((data_dir / "clean" / "books").glob("*.arrow"))[0]
    encode, calls = shards.encode_documents, []

    def recording(processor, texts, num_threads=1):
        calls.append([len(text.encode("utf-8")) for text in texts])
        return encode(processor, texts, num_threads=num_threads)

    monkeypatch.setattr(shards, "encode_documents", recording)
    written = {}
    for batch_bytes in (1 << 18, 4096):
        calls.clear()
        out = tmp_path / f"out-{batch_bytes}"
        entry = shards.tokenize_part(str(part), str(out / "books" / "part.arrow"),
                                     str(data_dir / "tokenizer" / "tokenizer.model"), str(tmp_path / "none.npy"),
                                     str(out), batch_bytes=batch_bytes)
        assert all(len(texts) == 1 or sum(texts) <= batch_bytes for texts in calls), calls
        assert sum(len(texts) for texts in calls) == entry["num_docs"] == entry["docs"]
        written[batch_bytes] = (out / "books" / "part.arrow").read_bytes()
    assert sum(map(sum, calls)) > 4 * 4096 and len(calls) > 4  # the small bound did split the part
    assert written[4096] == written[1 << 18]


# ---------------------------------------------------------------------------------------------------------------
# Budgets, repetition, the tokenizer sample


def test_a_token_budget_is_met_in_real_tokens_after_dedup_to_within_one_shard(planted, tmp_path):
    budget = 20_000
    corpus = planted_corpus(planted["root"])
    corpus.sources[0].token_budget = budget
    manifest = prepare(corpus, tmp_path / "data")
    web = manifest.sources[0]
    assert web.num_tokens >= budget
    assert web.num_tokens - web.shards[-1].num_tokens < budget  # the last shard is the one that crossed it


def test_the_report_says_how_often_each_source_repeats_at_the_planned_tokens_and_warns(planted, tmp_path, capsys):
    corpus = planted_corpus(planted["root"], planned_tokens=2_000_000)
    manifest = prepare(corpus, tmp_path / "data")
    mixture = json.loads((tmp_path / "data" / "report.json").read_text())["_mixture"]
    web_tokens = manifest.sources[0].num_tokens
    assert mixture["web"]["tokens"] == web_tokens
    assert mixture["web"]["epochs"] == pytest.approx(0.7 * 2_000_000 / web_tokens, rel=1e-3)
    assert mixture["web"]["repeats"] is True
    assert "source 'web' will be seen" in capsys.readouterr().err


def test_the_tokenizer_sample_is_bounded_by_its_quota_and_weighted_by_source(planted, tmp_path):
    corpus = planted_corpus(planted["root"], tokenizer={"vocab_size": 1024, "sample_sentences": 300})
    prepare(corpus, tmp_path / "data")
    sample = tokenizer_sample(corpus, tmp_path / "data")
    assert len(sample) == 300
    again = tokenizer_sample(corpus, tmp_path / "data")
    assert again == sample  # seeded: the same data dir gives the same tokenizer


def test_the_tokenizer_sample_meets_its_quota_when_a_source_has_fewer_than_sixteen_parts(tmp_path):
    # Each part gives at most 1/16 of its source's quota so the sample spans many parts; a source of two parts
    # must still give its whole quota (a small corpus's tokenizer was trained on a sample a fraction of the size).
    root = tmp_path / "corpus"
    kit = {"web": kit_texts("c4_web_sample.jsonl.gz"), "books": kit_texts("openstax_textbooks.jsonl.gz")}
    for name, texts in kit.items():
        one_line = [f"{name}: " + " ".join(text.split()) for text in texts if len(text.split()) > 80][:200]
        for number in range(2):
            write_jsonl(root / name / f"part{number}.jsonl", one_line[number * 100:(number + 1) * 100])
    corpus = planted_corpus(root, docs_per_shard=1000, tokenizer={"vocab_size": 1024, "sample_sentences": 100})
    prepare(corpus, tmp_path / "data")
    sample = tokenizer_sample(corpus, tmp_path / "data")
    assert len(sample) == 100
    assert sum(line.startswith("web") for line in sample) == 70 and sum(line.startswith("books") for line in sample) == 30


# ---------------------------------------------------------------------------------------------------------------
# The reference corpus, offline


def test_the_reference_corpus_config_runs_unchanged_until_its_first_hub_source_and_fails_in_one_line(tmp_path):
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    out = tmp_path / "genesis-60b"
    result = subprocess.run([*GENESIS, "data", "prepare", "--corpus", "configs/corpus/genesis-60b.yaml", "--out", str(out)],
                            cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "HuggingFaceFW/fineweb-edu" in lines[0]
    assert not out.exists()  # nothing half-written


def test_a_bad_record_met_by_a_dask_worker_is_one_line_a_non_zero_exit_and_no_data_directory(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "a document long enough for the default filters, " * 3}) + "\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "another document long enough for the filters " * 3}) + "\n"
                                      + "{bad json\n")
    corpus = CorpusConfig.model_validate({
        "name": "bad", "executor": "dask", "workers": 2, "on_bad_record": "fail",
        "sources": [{"name": "web", "kind": "local", "paths": [str(tmp_path / "*.jsonl")], "weight": 1.0}]})
    config = write_corpus_yaml(tmp_path / "corpus.yaml", corpus)
    out = tmp_path / "data"
    result = subprocess.run([*GENESIS, "data", "prepare", "--corpus", str(config), "--out", str(out)], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [f"error: {tmp_path / 'b.jsonl'}:2: invalid JSON (Expecting property name enclosed in double "
                     f"quotes); fix the line or use on_bad_record: skip"], result.stderr
    assert not out.exists()


def _malloc_trim_threshold() -> dict:
    return {"MALLOC_TRIM_THRESHOLD_": os.environ.get("MALLOC_TRIM_THRESHOLD_")}


def test_the_stage_s_dask_workers_keep_glibc_s_own_malloc_thresholds():
    """Dask's nannies export MALLOC_TRIM_THRESHOLD_=65536, which fixes glibc's mmap threshold too: a tokenize job
    then maps and unmaps its lists again and again (about 8-11% of its speed). Jobs give memory back themselves;
    a threshold the user set in the environment still reaches the workers."""
    from data_prep.executor import DaskExecutor

    users = os.environ.get("MALLOC_TRIM_THRESHOLD_")  # read first: a nanny also exports it into this process
    executor = DaskExecutor(workers=1)
    try:
        assert executor.map(_malloc_trim_threshold, [()], "environment") == [{"MALLOC_TRIM_THRESHOLD_": users}]
    finally:
        executor.close()


ARENA_PROBE = r'''
import ctypes, sys, threading
from data_prep.executor import share_one_malloc_arena
if sys.argv[1] == "shared":
    share_one_malloc_arena()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
start = threading.Barrier(8)
def allocate():
    start.wait()  # all at once, as SentencePiece's trainer threads do
    blocks = [libc.malloc(4096) for _ in range(2000)]
    for block in blocks:
        libc.free(block)
threads = [threading.Thread(target=allocate) for _ in range(8)]
for thread in threads: thread.start()
for thread in threads: thread.join()
libc.fdopen.restype = ctypes.c_void_p
out = libc.fdopen(1, b"w")
libc.malloc_info(0, ctypes.c_void_p(out))
libc.fflush(ctypes.c_void_p(out))
'''


def malloc_heaps(mode: str) -> int:
    """glibc's malloc arenas ("heaps" in malloc_info) after 8 threads allocated at once in a fresh process."""
    result = subprocess.run([sys.executable, "-c", ARENA_PROBE, mode], cwd=REPO, capture_output=True, text=True,
                            timeout=60, check=True)
    return result.stdout.count("<heap nr=")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc arenas")
def test_the_prepare_driver_s_threads_share_one_malloc_arena_so_its_peak_does_not_hang_on_thread_timing():
    """SentencePiece trains with 8 threads in the driver; with an arena each, what they free stays spread over
    them, and the driver's peak varied by 30-60 MB from run to run on the same sample (its largest figure)."""
    assert malloc_heaps("default") > 1  # what glibc does unasked
    assert malloc_heaps("shared") == 1
