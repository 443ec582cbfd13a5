"""Every benchmark script imports here, on the CPU box: a script that breaks when a module it reads from changes
is found by the tests, not at the start of a lent GPU's few minutes (bench/two_gpu.py once imported a helper
that bench/checkpoint.py no longer had)."""

from __future__ import annotations

import importlib
import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
# Scripts that drive an anchor installed only where they run (datatrove is the data stage's anchor, #24).
ANCHOR_OF = {"datatrove_run": "datatrove"}


@pytest.mark.parametrize("script", sorted(path.stem for path in BENCH.glob("*.py") if path.stem != "__init__"))
def test_every_benchmark_script_imports(script):
    anchor = ANCHOR_OF.get(script)
    if anchor and importlib.util.find_spec(anchor) is None:
        pytest.skip(f"{anchor} is not installed here")
    importlib.import_module(f"bench.{script}")


def test_sdpa_keeps_its_first_file_as_the_first_run_before_appending(tmp_path):
    from bench.common import append_run, read_runs
    from bench.sdpa import keep_first_shape_as_a_run

    out = tmp_path / "sdpa.json"
    first = {"date": "2026-11-25", "machine": "NVIDIA H100 80GB HBM3", "runs": [{"backend": "flash", "ms": 0.589}]}
    out.write_text(json.dumps(first))

    keep_first_shape_as_a_run(out)
    keep_first_shape_as_a_run(out)  # a second call finds it converted
    append_run(out, {"machine": "NVIDIA H200", "timings": [{"backend": "flash", "ms": 0.5}]}, {})

    runs = read_runs(out)
    assert [run["machine"] for run in runs] == ["NVIDIA H100 80GB HBM3", "NVIDIA H200"]
    assert runs[0]["timings"] == [{"backend": "flash", "ms": 0.589}] and runs[0]["date"] == "2026-11-25"


def test_a_call_that_records_as_it_measures_appends_one_run_and_rewrites_only_that_run(tmp_path):
    from bench.common import CallRecord, append_run, read_runs

    out = tmp_path / "sweep.json"
    out.write_text(json.dumps({"date": "2026-11-25", "variants": {"a": 1}}))  # written before runs were kept
    append_run(out, {"date": "2026-11-30", "variants": {"b": 2}}, {"best": "b"})

    record = CallRecord(out)
    record.write({"date": "2026-12-05", "variants": {"c": 3}})
    append_run(out, {"date": "2026-12-05", "note": "another call, while this one measures"}, {})
    record.write({"date": "2026-12-05", "variants": {"c": 3, "d": 4}}, {"best": "d"})

    data = json.loads(out.read_text())
    assert [run.get("variants") for run in read_runs(out)] == [{"a": 1}, {"b": 2}, {"c": 3, "d": 4}, None]
    assert data["best"] == "d"


def test_a_call_record_with_the_whole_top_level_leaves_none_of_the_earlier_top(tmp_path):
    from bench.common import CallRecord, append_run

    out = tmp_path / "fig.json"
    append_run(out, {"x": 1}, {"x": 1, "only_then": True})
    record = CallRecord(out, whole_top=True)
    record.write({"x": 2}, {"x": 2, "partial": True})
    record.write({"x": 3}, {"x": 3})
    data = json.loads(out.read_text())
    assert {k: v for k, v in data.items() if k != "runs"} == {"x": 3}
    assert [run["x"] for run in data["runs"]] == [1, 3]
