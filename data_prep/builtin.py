"""A corpus every Python installation already has, for `genesis demo` on a machine with no downloads.

Three sources, each deterministic for a given Python version:
  prose   the language reference topics `help()` shows (pydoc_data) and the docstrings of the standard
          library's modules, classes and functions (read with `ast`: nothing is imported or executed);
  code    standard-library source files (tests excluded);
  dialog  the project's principle-shaped dialogues (configs/dialogues/topics.yaml), rendered as ChatML.
"""

from __future__ import annotations

import ast
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from genesis.config import config_root

CODE_BYTES = 4_000_000
SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "turtledemo", "__pycache__", "ensurepip"}


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root).parts
        if not SKIP_DIRS.intersection(relative) and not relative[-1].startswith("test_"):
            files.append(path)
    return files


def prose_texts() -> Iterator[str]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield topics[name].strip()
    for path in stdlib_files():
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        module = path.stem if path.stem != "__init__" else path.parent.name
        pieces = []
        if doc := ast.get_docstring(tree):
            pieces.append(f"Module {module}\n\n{doc}")
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 80:
                    kind = "class" if isinstance(node, ast.ClassDef) else "function"
                    pieces.append(f"{module}.{node.name} ({kind})\n\n{doc}")
        if pieces:
            yield "\n\n".join(pieces)


def code_texts(max_bytes: int = CODE_BYTES) -> Iterator[str]:
    produced = 0
    for path in stdlib_files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        if len(text) < 200:
            continue
        yield text
        produced += len(text)
        if produced >= max_bytes:
            return


def dialog_texts() -> Iterator[str]:
    """The project's principle-shaped dialogues (configs/dialogues/topics.yaml), training topics only, as chat
    text: held-out topics stay out of pretraining so branch evaluation never sees a memorised answer."""
    from genesis.chat import render_chat_for_pretraining
    from genesis.principles.dialogues import load_topics, sft_conversations, split_topics
    from genesis.principles import load_principles

    if not (config_root() / "dialogues" / "topics.yaml").is_file():
        return
    train_topics, _ = split_topics(load_topics())
    system_prompt = load_principles().system_prompt("brief")
    for conversation in sft_conversations(train_topics, system_prompt):
        yield render_chat_for_pretraining(conversation["messages"])


def builtin_texts(subset: str = "all") -> Iterator[str]:
    if subset in ("prose", "all"):
        yield from prose_texts()
    if subset in ("code", "all"):
        yield from code_texts()
    if subset in ("dialog", "all"):
        yield from dialog_texts()
