"""Every benchmark script imports here, on the CPU box: a script that breaks when a module it reads from changes
is found by the tests, not at the start of a lent GPU's few minutes (bench/two_gpu.py once imported a helper
that bench/checkpoint.py no longer had)."""

from __future__ import annotations

import importlib
import importlib.util
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
