"""Pipeline-level commands: `genesis demo` (the whole tree under an embedded Prefect) and `genesis lineage`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def cmd_demo(args: argparse.Namespace) -> int:
    from flows.demo import demo

    summary = demo(args.workdir, nproc=args.nproc)
    if args.summary_json:
        from flows.demo import write_summary

        write_summary(summary, Path(args.summary_json))
    return 0


def cmd_lineage(args: argparse.Namespace) -> int:
    from lineage.registry import connect, format_lineage, lineage

    tracker = connect(args.tracking_uri)
    tree = lineage(tracker)
    print(json.dumps(tree, indent=2, default=str) if args.json else format_lineage(tree))
    return 0


def register(sub) -> None:
    lineage = sub.add_parser("lineage", help="the tree (trunk, milestones, branches) from the MLflow registry")
    lineage.add_argument("--tracking-uri", default=None, help="default: MLFLOW_TRACKING_URI or the project's SQLite store")
    lineage.add_argument("--json", action="store_true")
    lineage.set_defaults(handler=cmd_lineage)

    demo = sub.add_parser("demo", help="the whole pipeline on the built-in corpus, on CPU, in minutes")
    demo.add_argument("--workdir", type=Path, default=Path("runs/demo"))
    demo.add_argument("--nproc", type=int, default=2, help="trainer ranks (gloo on CPU)")
    demo.add_argument("--summary-json", type=Path, default=None)
    demo.set_defaults(handler=cmd_demo)
