"""Local record files, read the same way by every stage: globs resolved against the repository, the `datasets`
builder for a file, JSONL read line by line so a bad record is named by its file and line, and JSON array files.

Also the record shapes the chat module does not read itself: Glaive's plain-text transcripts
(`glaive_to_conversation`)."""

from __future__ import annotations

import glob
import gzip
import json
import re
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


def open_text(path: Path):
    """`path` opened for reading as UTF-8 text, gunzipped if it ends in .gz."""
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def first_json_char(path: Path) -> str:
    """The first non-whitespace character of a JSON file ("" when there is none): "[" opens a JSON array."""
    try:
        with open_text(path) as handle:
            while chunk := handle.read(4096):
                stripped = chunk.lstrip()
                if stripped:
                    return stripped[0]
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 (byte {err.start}); re-encode the file as UTF-8") from None
    return ""


def read_json_document(path: Path):
    """The whole file as one JSON value (an array of records, or one object spanning lines); a decoding error
    names the file and line. NOTE: the file is parsed whole, so its size bounds memory: big sources belong in
    JSON Lines, which are read a line at a time."""
    try:
        with open_text(path) as handle:
            return json.load(handle)
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 (byte {err.start}); re-encode the file as UTF-8") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: invalid JSON ({err.msg}, column {err.colno}); fix the file or write "
                        f"it as JSON Lines (one record a line)") from None


# -------------------------------------------------------------------------------------------------------------
# Glaive (glaiveai/glaive-function-calling-v2): columns `system` and `chat`, both plain text.
#
#   system: "SYSTEM: You are a helpful assistant with access to the following functions. Use them if required -\n"
#           followed by the function schemas as JSON objects separated by blank lines, or "SYSTEM: You are a
#           helpful assistant, with no access to external functions."
#   chat:   "USER: ...\n\n\nASSISTANT: <functioncall> {"name": "f", "arguments": '{"x": 1}'} <|endoftext|>\n\n\n"
#           "FUNCTION RESPONSE: {...}\n\n\nASSISTANT: ... <|endoftext|>\n\n\n"
#
# Arguments are a JSON object written inside single quotes (so the call itself is not JSON), or a bare object.

GLAIVE_WITH_TOOLS = "You are a helpful assistant with access to the following functions. Use them if required -"
GLAIVE_NO_TOOLS = "You are a helpful assistant, with no access to external functions."
GLAIVE_EOS = "<|endoftext|>"
GLAIVE_CALL = "<functioncall>"
_GLAIVE_TURN = re.compile(r"(?:^|\n)[ \t]*(USER|ASSISTANT|FUNCTION RESPONSE):[ \t]*")
_GLAIVE_CALL_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"(?P<name>[^"]+)"\s*,\s*"arguments"\s*:\s*')


def glaive_tools(system: str) -> tuple[str | None, list | None]:
    """(system prompt, tools) of Glaive's `system` column. The stock sentences are dropped (the chat template
    writes its own tool header); any other system text is kept as the system prompt."""
    text = system.strip().removeprefix("SYSTEM:").strip()
    if text.startswith(GLAIVE_WITH_TOOLS):
        rest, tools, position = text[len(GLAIVE_WITH_TOOLS):], [], 0
        decoder = json.JSONDecoder()
        while True:
            while position < len(rest) and rest[position].isspace():
                position += 1
            if position == len(rest):
                break
            schema, position = decoder.raw_decode(rest, position)  # JSONDecodeError is a ValueError
            if not isinstance(schema, dict) or not isinstance(schema.get("name"), str):
                raise ValueError("a Glaive function schema is not an object with a name")
            tools.append({"type": "function", "function": schema})
        return None, tools or None
    if text == GLAIVE_NO_TOOLS or not text:
        return None, None
    return text, None


def _glaive_call(text: str) -> dict:
    head = _GLAIVE_CALL_HEAD.match(text)
    body = text[head.end():].rstrip() if head else ""
    if not head or not body.endswith("}"):
        raise ValueError(f"a Glaive function call is not {{\"name\": ..., \"arguments\": ...}}: {text[:80]!r}")
    arguments = body[:-1].strip()
    if len(arguments) >= 2 and arguments[0] == arguments[-1] == "'":
        arguments = arguments[1:-1]
    arguments = json.loads(arguments)
    if not isinstance(arguments, dict):
        raise ValueError("Glaive function-call arguments are not a JSON object")
    return {"type": "function", "function": {"name": head["name"], "arguments": arguments}}


def glaive_messages(chat: str) -> list[dict]:
    """Glaive's `chat` transcript as messages: tool calls structured, function responses as tool turns, the
    transcript's own end-of-text markers removed, consecutive assistant turns (a sentence, then the call) joined,
    and a final unanswered user turn dropped."""
    pieces = _GLAIVE_TURN.split(chat)
    if pieces[0].strip():
        raise ValueError("a Glaive chat does not start with a USER: or ASSISTANT: turn")
    messages: list[dict] = []
    last_called = ""
    for tag, body in zip(pieces[1::2], pieces[2::2]):
        body = body.replace(GLAIVE_EOS, "").strip()
        if tag == "USER":
            if body:
                messages.append({"role": "user", "content": body})
        elif tag == "FUNCTION RESPONSE":
            messages.append({"role": "tool", "name": last_called, "content": body})
        else:
            content, *calls = body.split(GLAIVE_CALL)
            content = content.strip()
            tool_calls = [_glaive_call(call) for call in calls]
            if not content and not tool_calls:
                continue
            if tool_calls:
                last_called = tool_calls[-1]["function"]["name"]
            previous = messages[-1] if messages else None
            if previous and previous["role"] == "assistant" and not previous.get("tool_calls"):
                previous["content"] = "\n\n".join(part for part in (previous["content"], content) if part)
                if tool_calls:
                    previous["tool_calls"] = tool_calls
                continue
            message = {"role": "assistant", "content": content}
            if tool_calls:
                message["tool_calls"] = tool_calls
            messages.append(message)
    while messages and messages[-1]["role"] == "user":
        messages.pop()
    if not messages:
        raise ValueError("a Glaive chat without a single answered turn")
    return messages


def glaive_to_conversation(record: dict) -> tuple[list[dict], list | None]:
    """A glaiveai/glaive-function-calling-v2 record as (messages, tools), the shapes `genesis.chat.render_chat`
    and Hugging Face chat templates take; KeyError/TypeError/ValueError mean it is malformed."""
    chat = record["chat"]
    system = record.get("system") or ""
    if not isinstance(chat, str) or not isinstance(system, str):
        raise TypeError("Glaive's `system` and `chat` are text")
    prompt, tools = glaive_tools(system)
    messages = glaive_messages(chat)
    return ([{"role": "system", "content": prompt}] if prompt else []) + messages, tools
