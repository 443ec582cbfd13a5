"""Local record files, read the same way by every stage: globs resolved against the repository, the `datasets`
builder for a file, and JSONL read line by line so a bad record is named by its file and line."""

from __future__ import annotations

import glob
import gzip
import json
from collections.abc import Iterator
from pathlib import Path

from genesis.config import REPO_ROOT
from genesis.errors import DataError


def resolve_paths(patterns: list[str], owner: str) -> list[Path]:
    """The files `patterns` (paths or globs, relative to the repository root) name, in order; a pattern that
    matches nothing is one line naming `owner` (the source) and the pattern."""
    files: list[Path] = []
    for pattern in patterns:
        full = pattern if Path(pattern).is_absolute() else str(REPO_ROOT / pattern)
        matches = sorted(glob.glob(full))
        if not matches:
            raise DataError(f"source '{owner}': no file matches {pattern}; fix the path in the config")
        files += [Path(m) for m in matches]
    return files


def builder_for(path: Path) -> str:
    """The `datasets` builder that reads a local file: json, parquet or text."""
    name = path.name.removesuffix(".gz")
    if name.endswith((".jsonl", ".json")):
        return "json"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".txt"):
        return "text"
    raise DataError(f"{path}: unknown file type; use .jsonl[.gz], .json, .parquet or .txt")


def scan_jsonl_numbered(path: Path, on_bad: str, counts: dict,
                        skip_hint: str = "use on_bad_record: skip") -> Iterator[tuple[int, object]]:
    """(line number, parsed JSON) of every non-blank line; an invalid line fails naming file:line (with
    `skip_hint` as the way out) or is skipped and counted."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    if on_bad == "fail":
                        raise DataError(f"{path}:{line_number}: invalid JSON ({err.msg}); fix the line or {skip_hint}") from None
                    counts["invalid_json"] = counts.get("invalid_json", 0) + 1
                    continue
                yield line_number, record
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 (byte {err.start}); re-encode the file as UTF-8") from None
