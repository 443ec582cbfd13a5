"""The first ten minutes (#26): `genesis --version`, an example in every command's help, and (slow) every command
`genesis demo` prints, run as printed."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_version_names_the_package_the_git_commit_and_torch():
    done = subprocess.run([sys.executable, "-m", "cli.main", "--version"], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    line = done.stdout.strip()
    commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    assert re.fullmatch(r"genesis \d+\.\d+\.\d+\S* \(git [0-9a-f]{12}(-dirty)?\), torch \S+, Python \S+", line), line
    assert commit in line


def test_every_command_help_ends_with_examples_of_that_command_which_parse():
    from cli.main import build_parser, subparsers

    parser = build_parser()
    commands = list(subparsers(parser))
    assert {" ".join(words) for words, _ in commands} >= {
        "train", "export-hf", "export-gguf", "import-hf", "generate", "data", "data prepare", "data verify",
        "tokenizer", "tokenizer train", "tokenizer hf", "branch", "lineage", "promote", "demo", "serve", "plot"}
    for words, command in commands:
        help_text = command.format_help()
        block = help_text.split("\nexample:\n" if "\nexample:\n" in help_text else "\nexamples:\n")
        assert len(block) == 2, f"genesis {' '.join(words)} --help has no example block"
        lines = [line.strip() for line in block[1].splitlines() if line.strip()]
        assert lines and all(line.startswith("genesis ") for line in lines), (words, lines)
        for line in lines:
            argv = shlex.split(line)[1:]
            assert argv[:len(words)] == words, f"{line!r} is not an example of genesis {' '.join(words)}"
            parsed = parser.parse_args(argv)  # the example is a command the parser takes as written
            assert parsed.handler is not None
