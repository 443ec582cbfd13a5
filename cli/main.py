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


class VersionAction(argparse.Action):
    """`genesis --version`: the package version, the git commit and torch's version, read without importing torch."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from genesis.version import version_line

        print(version_line())
        parser.exit()


class HelpFormatter(argparse.HelpFormatter):
    """argparse's, except that an indented line (an example command) is kept as written, never re-wrapped."""

    def _fill_text(self, text, width, indent):
        return "\n".join(line if line.startswith(" ") else super(HelpFormatter, self)._fill_text(line, width, indent)
                         for line in text.splitlines())


def subparsers(parser: argparse.ArgumentParser):
    """Every command's parser below `parser`, as (command words, parser): (["data", "prepare"], ...), ..."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield [name], child
                for words, grandchild in subparsers(child):
                    yield [name, *words], grandchild


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="genesis", description="Train small LLMs from scratch and grow them as a tree.",
                                     epilog="start with: genesis demo   (then each command's --help ends with examples)",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--version", action=VersionAction, help="the Genesis version, git commit and torch version")
    sub = parser.add_subparsers(dest="command", required=True)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(sub)
    for _, command in subparsers(parser):
        command.formatter_class = HelpFormatter
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
