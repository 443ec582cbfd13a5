"""Pipeline-level commands: `genesis demo`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def cmd_demo(args: argparse.Namespace) -> int:
    from genesis.demo import demo

    summary = demo(args.workdir, nproc=args.nproc)
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps(summary, indent=2))
    return 0


def register(sub) -> None:
    demo = sub.add_parser("demo", help="the whole pipeline on the built-in corpus, on CPU, in minutes")
    demo.add_argument("--workdir", type=Path, default=Path("runs/demo"))
    demo.add_argument("--nproc", type=int, default=2, help="trainer ranks (gloo on CPU)")
    demo.add_argument("--summary-json", type=Path, default=None)
    demo.set_defaults(handler=cmd_demo)
