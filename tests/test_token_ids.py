"""Token ids a tokenizer cannot have made (issue #23, item 8).

A shard holding an id at or beyond the manifest's vocab_size used to pass `genesis data verify` and kill training
with a 47-line IndexError from the embedding lookup. Now `verify` reads every shard's ids, and the trainer's start
refuses such data in one line using the max id the shard writer records (reading only shards of manifests written
before it was recorded), and refuses a model whose vocab uint16 shards cannot fill.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from genesis.manifest import read_manifest, write_manifest, write_shard
from tests.conftest import REPO, TINY_CPU, make_token_data

VOCAB = 4096


def make_data(tmp_path: Path) -> Path:
    return make_token_data(tmp_path / "data", vocab_size=VOCAB, docs_per_shard=20)


def add_shard(data_dir: Path, docs: list[list[int]]) -> Path:
    """Write `docs` with the real shard writer and list the shard in the manifest, as the data stage does."""
    manifest = read_manifest(data_dir)
    entry = write_shard(data_dir / "web" / "shard_extra.arrow", docs, eos_id=2)
    entry.path = "web/shard_extra.arrow"
    manifest.sources[0].shards.append(entry)
    write_manifest(data_dir, manifest)
    return data_dir / entry.path


def edit_manifest(data_dir: Path, edit) -> None:
    """Change manifest.json's raw JSON, as an older Genesis or a hand edit would have left it."""
    path = data_dir / "manifest.json"
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw))


def forget_max_ids(raw: dict) -> None:
    for source in raw["sources"]:
        for shard in source["shards"]:
            shard.pop("max_token_id", None)


def genesis(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, text=True, timeout=300,
                          cwd=REPO)


def train(data_dir: Path, run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    """Start the real trainer (`genesis_model.train.main`) on one CPU rank, as `genesis train` does."""
    command = [sys.executable, "-m", "genesis_model.train", "--config", str(TINY_CPU), f"data_dir={data_dir}",
               f"run_dir={run_dir}", "max_steps=2", "micro_batch_size=2", "seq_len=64", "eval.every=0", *overrides]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0, result.stdout[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    return lines[0]


def test_the_shard_writer_records_each_shards_largest_token_id_in_its_manifest_entry(tmp_path):
    entry = write_shard(tmp_path / "s.arrow", [[5, 900, 2], [7, 2]], eos_id=2)
    assert entry.max_token_id == 900


def test_recording_max_ids_keeps_the_data_fingerprint_so_runs_on_older_manifests_resume(tmp_path):
    """The fingerprint is in every checkpoint; a new field in the manifest must not make old runs' data 'differ'."""
    data = make_data(tmp_path)
    recorded = read_manifest(data).fingerprint()
    edit_manifest(data, forget_max_ids)
    assert read_manifest(data).fingerprint() == recorded


def test_data_verify_refuses_a_token_id_at_the_vocab_size_in_one_line(tmp_path):
    data = make_data(tmp_path)
    assert genesis("data", "verify", str(data)).returncode == 0
    shard = add_shard(data, [[5, 6, 7, 2], [8, VOCAB, 9, 2]])
    line = one_error_line(genesis("data", "verify", str(data)))
    assert str(shard) in line and f"token id {VOCAB}" in line and f"vocab_size {VOCAB}" in line


def test_data_verify_reads_the_tokens_so_a_manifest_understating_the_max_id_is_refused(tmp_path):
    """A manifest can lie (hand-edited, or written by a buggy tool): `verify` trusts only the shard's bytes."""
    data = make_data(tmp_path)
    add_shard(data, [[5, 5000, 2]])
    edit_manifest(data, lambda raw: raw["sources"][0]["shards"][-1].update(max_token_id=100))
    line = one_error_line(genesis("data", "verify", str(data)))
    assert "shard_extra.arrow" in line and "5000" in line


def test_data_verify_checks_the_ids_of_a_manifest_written_before_max_ids_were_recorded(tmp_path):
    data = make_data(tmp_path)
    add_shard(data, [[5, 5000, 2]])
    edit_manifest(data, forget_max_ids)
    line = one_error_line(genesis("data", "verify", str(data)))
    assert "shard_extra.arrow" in line and "token id 5000" in line


def test_training_on_a_shard_with_an_id_beyond_the_vocab_is_refused_in_one_line_and_writes_nothing(tmp_path):
    data = make_data(tmp_path)
    add_shard(data, [[5, 6, 7, 2], [8, VOCAB + 4, 9, 2]])
    line = one_error_line(train(data, tmp_path / "run"))
    assert "shard_extra.arrow" in line and f"token id {VOCAB + 4}" in line and "IndexError" not in line
    assert not (tmp_path / "run").exists()


def test_training_reads_the_ids_of_shards_whose_manifest_does_not_record_them(tmp_path):
    data = make_data(tmp_path)
    add_shard(data, [[8, VOCAB + 4, 9, 2]])
    edit_manifest(data, forget_max_ids)
    line = one_error_line(train(data, tmp_path / "run"))
    assert "shard_extra.arrow" in line and f"token id {VOCAB + 4}" in line


def test_training_refuses_a_model_vocab_that_uint16_shards_cannot_fill(tmp_path):
    """Ids in uint16 shards stop at 65,535: a larger model vocab was meant for another tokenizer."""
    data = make_data(tmp_path)
    line = one_error_line(train(data, tmp_path / "run", "model.vocab_size=70000"))
    assert "manifest.json" in line and "uint16" in line and "70000" in line
    assert not (tmp_path / "run").exists()


def test_a_prepare_rerun_records_the_max_id_of_a_shard_whose_sidecar_predates_it(tmp_path):
    """A rerun of `genesis data prepare` keeps complete shards; their manifest entries should still carry the id,
    so the trainer's start need not read them."""
    from data_prep.shards import completed_entry, sidecar_of

    shard = tmp_path / "web" / "shard_00000.arrow"
    entry = write_shard(shard, [[5, 1234, 2]], eos_id=2)
    sidecar_of(shard).write_text(entry.model_dump_json(exclude={"max_token_id"}))
    assert completed_entry(shard).max_token_id == 1234



@pytest.mark.parametrize("outcome", ["refused", "completed"])
def test_training_joins_the_process_groups_threads_before_it_returns(tmp_path, outcome):
    """The last line is the run's own: gloo's worker threads must be joined while the interpreter lives. Left to
    interpreter shutdown (the device mesh, and through it the process group, is kept by reference cycles: a
    failed check's traceback, the model's DTensors), a worker releasing the last collective's tensors needs the
    GIL, is ended by the finalizing interpreter, and aborts the process after the error line ("terminate called
    without an active exception", seen in CI under load)."""
    data = make_data(tmp_path)
    if outcome == "refused":
        add_shard(data, [[8, VOCAB + 4, 9, 2]])
    script = (
        "import os, sys\n"
        "from genesis_model.train import main\n"
        "threads = lambda: len(os.listdir('/proc/self/task'))\n"
        "before = threads()\n"
        "code = main(sys.argv[1:])\n"
        "print(code, before, threads())\n"
    )
    command = [sys.executable, "-c", script, "--config", str(TINY_CPU), f"data_dir={data}",
               f"run_dir={tmp_path / 'run'}", "max_steps=2", "micro_batch_size=2", "seq_len=64", "eval.every=0"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    code, before, after = map(int, result.stdout.split()[-3:])
    assert code == (2 if outcome == "refused" else 0), result.stderr[-2000:]
    assert after == before, f"{after - before} threads left running after the run {outcome}"
