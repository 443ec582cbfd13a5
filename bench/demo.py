"""Time `genesis demo` from an empty work directory and record its figures.

    python bench/demo.py --out bench/results/demo.json
"""

import argparse
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import append_run, command_line, environment, git_rev  # noqa: E402
from flows.demo import demo  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/genesis-demo-bench"))
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "demo.json")
    args = parser.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    started = time.perf_counter()
    summary = demo(args.workdir)
    seconds = time.perf_counter() - started
    run = {**environment(), "command": command_line("demo.py"), "git_rev": git_rev(), "seconds": round(seconds, 1),
           "val_loss": summary["val_loss"], "unigram_val_loss": summary["unigram_val_loss"],
           "milestones": summary["milestones"], "branches": summary["branches"], "samples": summary["samples"]}
    append_run(args.out, run, run, whole_top=True)  # the top level: the newest run


if __name__ == "__main__":
    main()
