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
