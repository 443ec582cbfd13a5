"""`genesis_model.train` as torchrun's entry point, plus a record of what this process spent before training and on
torch.compile: bench/checkpoint.py launches the trainer through this file to split a resume into its parts.

At exit it writes JSON to $GENESIS_COMPILE_STATS (if set): when the process started and when the imports were
done (wall clock), Dynamo's counters (FX-graph and AOTAutograd cache hits and misses among them), the seconds
per compile phase (`compilation_time_metrics`), and one row per compiled frame from Dynamo's compilation
metrics. Imports whatever `genesis_model` is on PYTHONPATH, so it measures an older source tree as well.
"""

import atexit
import json
import os
import sys
import time

STARTED = time.time()
IMPORTED = None


def _frame_rows() -> list[dict]:
    from torch._dynamo import utils

    getter = getattr(utils, "get_compilation_metrics", None)
    rows = []
    for metrics in (getter() if getter else []):
        fields = getattr(metrics, "__dict__", {})
        rows.append({key: value for key, value in fields.items()
                     if isinstance(value, (bool, int, float)) or (isinstance(value, str) and len(value) < 160)})
    return rows


def _dump() -> None:
    path = os.environ.get("GENESIS_COMPILE_STATS")
    if not path:
        return
    stats: dict = {"process_started": STARTED, "imported": IMPORTED}
    try:
        from torch._dynamo import utils

        stats["counters"] = {group: {str(key)[:160]: value for key, value in counter.items()}
                             for group, counter in utils.counters.items() if counter}
        stats["compile_phase_s"] = {name: [round(sum(times), 3), len(times)]
                                    for name, times in utils.compilation_time_metrics.items()}
        stats["frames"] = _frame_rows()
    except Exception as err:  # noqa: BLE001 - a probe never fails the run it measures
        stats["error"] = f"{type(err).__name__}: {err}"[:300]
    with open(path, "w") as handle:
        json.dump(stats, handle, default=str)


atexit.register(_dump)

from genesis_model.train import main  # noqa: E402

IMPORTED = time.time()

if __name__ == "__main__":
    sys.exit(main())
