"""Pipeline-level commands: `genesis demo` (the whole tree under an embedded Prefect), `genesis lineage` and
`genesis promote`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from genesis.cli_help import examples


def cmd_demo(args: argparse.Namespace) -> int:
    from flows.demo import demo

    summary = demo(args.workdir, nproc=args.nproc, quick=args.quick)
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


def cmd_promote(args: argparse.Namespace) -> int:
    from lineage.registry import connect, model_name, promote

    tracker = connect(args.tracking_uri)
    name = model_name(args.model)
    version, before = promote(tracker, name, args.version, args.alias)
    moved = "stays at" if before == version else (f"moved from v{before} to" if before else "set to")
    print(f"{name}@{args.alias} {moved} v{version}: models:/{name}@{args.alias}")
    return 0


TRACKING_HELP = "default: MLFLOW_TRACKING_URI or the project's SQLite store"


def register(sub) -> None:
    lineage = sub.add_parser("lineage", help="the tree (trunk, milestones, branches) from the MLflow registry, with "
                                             "where each alias (champion, latest, step-N) points",
                             epilog=examples("genesis lineage",
                                             "genesis lineage --tracking-uri sqlite:///runs/mlflow/mlflow.db --json"))
    lineage.add_argument("--tracking-uri", default=None, help=TRACKING_HELP)
    lineage.add_argument("--json", action="store_true")
    lineage.set_defaults(handler=cmd_lineage)

    promote = sub.add_parser(
        "promote", help="point a model's champion alias at a version",
        description="Point MODEL's alias (champion unless --alias) at a version, given by number or by alias. "
                    "models:/MODEL@champion then loads it (genesis generate/serve, mlflow.pyfunc, mlflow models serve).",
        epilog=examples("genesis promote genesis-dpo step-200", "genesis promote dpo 3", "genesis promote dpo latest"))
    promote.add_argument("model", help="genesis-base, genesis-sft or genesis-dpo (or base, sft, dpo)")
    promote.add_argument("version", help="a version number (3 or v3) or an alias (latest, step-150, ...)")
    promote.add_argument("--alias", default="champion", help="the alias to move (default: champion)")
    promote.add_argument("--tracking-uri", default=None, help=TRACKING_HELP)
    promote.set_defaults(handler=cmd_promote)

    demo = sub.add_parser("demo", help="the whole pipeline on the built-in corpus, on CPU, in minutes",
                          epilog=examples("genesis demo", "genesis demo --quick --workdir /tmp/genesis-demo"))
    demo.add_argument("--workdir", type=Path, default=Path("runs/demo"))
    demo.add_argument("--nproc", type=int, default=2, help="trainer ranks (gloo on CPU)")
    demo.add_argument("--quick", action="store_true",
                      help="the same tree, smaller: 60 trunk steps with milestones at 30 and 60, branches of a few steps")
    demo.add_argument("--summary-json", type=Path, default=None)
    demo.set_defaults(handler=cmd_demo)
