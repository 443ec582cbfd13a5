"""The example block every `genesis` command's --help ends with."""

from __future__ import annotations


def examples(*commands: str) -> str:
    """An epilog: `example:` (or `examples:`) and one pasteable command per line, each run from the repository root."""
    return ("examples:" if len(commands) > 1 else "example:") + "".join(f"\n  {command}" for command in commands)
