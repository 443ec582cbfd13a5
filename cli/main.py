"""`genesis`: the command line front door, a thin dispatcher.

Each stage registers its own commands (`register(sub)`), and a command imports its stage only when it runs:
engine commands (`cli/engine.py`) import neither Prefect nor MLflow, so they run on a bare GPU box. Every
command turns bad input into one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Command modules, in the order `genesis --help` lists them. Each holds only argument parsing; the stage it
# drives is imported inside the handler.
COMMAND_MODULES = ("cli.engine", "data_prep.cli", "branch.cli", "cli.pipeline", "serve.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="genesis", description="Train small LLMs from scratch and grow them as a tree.")
    sub = parser.add_subparsers(dest="command", required=True)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from genesis.errors import GenesisError

    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except GenesisError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
