"""SFT conversations and DPO preference pairs from configured sources, checked, split and reported.

Sources are hub datasets (through `datasets`), local files (JSONL plain or .gz through a line reader that
names file:line, Parquet through `datasets`) or the built-in dialogues. Every conversation is checked: roles
alternate (system first if at all; tool results only after a tool call), no empty turns, it ends with the
assistant, and it fits the context. Failing ones are dropped, counted by reason and listed (a few locations)
in the report. A record that is not a conversation at all (invalid JSON, missing field) stops the branch with
its file and line, unless `on_malformed: skip`.

Function-calling records are stored for TRL with their tool list folded into the system turn and tool-call
arguments as JSON strings: Arrow (under `datasets`) cannot hold free-form JSON objects whose keys differ from
row to row, and would otherwise fill the union of all keys with nulls. The chat template renders the folded
form to exactly the same text as the original.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from pydantic import Field

from genesis.chat import TOOLS_HEADER, as_messages, record_to_conversation
from genesis.config import StrictModel
from genesis.errors import DataError
from genesis.records import builder_for, glaive_to_conversation, resolve_paths, scan_jsonl_numbered

class BranchSource(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    kind: Literal["hub", "local"] = Field(description="the built-in dialogues are switched on by builtin_dialogues")
    hub_id: str | None = None
    subset: str | None = None
    split: str = "train"
    paths: list[str] = Field(default_factory=list, description="local files or globs, relative to the repo root")
    format: Literal["chat", "sharegpt", "function_calling", "xlam", "glaive", "preference", "rubric",
                    "hedged_rewrite"] = Field(
        default="chat", description="DPO sources: preference (TRL's pairs), rubric (candidate replies ranked by the "
                                    "rubric) or hedged_rewrite (chat records: the final answer against a hedged "
                                    "rewrite of it)")
    messages_field: str = "messages"
    max_records: int | None = Field(default=None, gt=0)
    min_margin: float = Field(default=1.0, ge=0, description="rubric sources: score gap needed to make a pair")
    min_answer_chars: int = Field(default=80, ge=1, description="hedged_rewrite sources: shorter answers are too "
                                                                "thin to stand for substance and make no pair")



# -------------------------------------------------------------------------------------------------------------
# Reading with locations


def iter_located_records(source: BranchSource, on_malformed: str, counts: dict) -> Iterator[tuple[str, dict]]:
    """(location, record) for every record of a local or hub source; location is `file:line` or `hub:id#n`."""
    if source.kind == "hub":
        import datasets

        if not source.hub_id:
            raise DataError(f"branch source '{source.name}': kind hub needs hub_id")
        dataset = datasets.load_dataset(source.hub_id, source.subset, split=source.split, streaming=True)
        for index, record in enumerate(dataset):
            yield f"{source.hub_id}#{index + 1}", record
        return
    for path in resolve_paths(source.paths, source.name):
        if builder_for(path) == "json":
            line = 0
            opener_counts: dict = {}
            # NOTE: a line reader, not `datasets`, so a bad record is reported with its exact line.
            for line, record in _numbered_jsonl(path, on_malformed, opener_counts):
                yield f"{path}:{line}", record
            for key, value in opener_counts.items():
                counts[key] = counts.get(key, 0) + value
        else:
            import datasets

            dataset = datasets.load_dataset(builder_for(path), data_files=str(path), split="train", streaming=True)
            for index, record in enumerate(dataset):
                yield f"{path}#{index + 1}", record


def _numbered_jsonl(path: Path, on_malformed: str, counts: dict) -> Iterator[tuple[int, dict]]:
    for line_number, record in scan_jsonl_numbered(path, on_malformed, counts, skip_hint="set on_malformed: skip"):
        if not isinstance(record, dict):
            if on_malformed == "fail":
                raise DataError(f"{path}:{line_number}: a record must be a JSON object")
            counts["malformed_record"] = counts.get("malformed_record", 0) + 1
            continue
        yield line_number, record


# -------------------------------------------------------------------------------------------------------------
# Checks


def conversation_problem(messages: list[dict]) -> str | None:
    """Why a conversation cannot train a chat model, or None if it can."""
    if not messages:
        return "empty_conversation"
    expected_next = {"user": {"assistant"}, "tool": {"tool", "assistant"}}
    previous = None
    for index, message in enumerate(messages):
        role = message.get("role")
        if role not in ("system", "user", "assistant", "tool"):
            return "unknown_role"
        content = message.get("content")
        has_calls = role == "assistant" and bool(message.get("tool_calls"))
        if content is not None and not isinstance(content, str):
            return "non_text_content"
        if not has_calls and not (content or "").strip():
            return "empty_turn"
        if role == "system":
            if index != 0:
                return "system_not_first"
        elif previous in (None, "system"):
            if role != "user":
                return "does_not_start_with_user"
        elif previous == "assistant":
            if role == "tool" and not messages[index - 1].get("tool_calls"):
                return "tool_result_without_call"
            if role not in ("user", "tool"):
                return "roles_do_not_alternate"
        elif role not in expected_next.get(previous, set()):
            return "roles_do_not_alternate"
        previous = role
    if previous != "assistant":
        return "does_not_end_with_assistant"
    return None


def explicit_prompt_pair(prompt, chosen, rejected) -> dict:
    """Any of TRL's preference shapes → {prompt: messages, chosen: [assistant], rejected: [assistant]}.

    Explicit prompts come as messages or as a string (`{"prompt": str, "chosen": str, "rejected": str}`).
    Implicit ones (TRL's `extract_prompt` case, and HuggingFaceH4/ultrafeedback_binarized, whose `chosen` and
    `rejected` are whole conversations beside a string `prompt`) share their prompt turns; those turns become
    the prompt. Shapes that fit none of these pass through for `preference_problem` to name."""
    if isinstance(chosen, str):
        chosen = [{"role": "assistant", "content": chosen}]
    if isinstance(rejected, str):
        rejected = [{"role": "assistant", "content": rejected}]
    whole_conversations = (isinstance(chosen, list) and isinstance(rejected, list) and len(chosen) > 1
                           and isinstance(chosen[0], dict) and chosen[0].get("role") != "assistant")
    if whole_conversations:
        shared = 0
        while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
            shared += 1
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    elif prompt is None:
        raise KeyError("prompt")  # an explicit pair without its prompt: the caller reports the record
    return {"prompt": as_messages(prompt), "chosen": chosen, "rejected": rejected}


def preference_problem(record: dict) -> str | None:
    prompt, chosen, rejected = record.get("prompt"), record.get("chosen"), record.get("rejected")
    if not isinstance(prompt, list) or not prompt:
        return "prompt_not_messages"
    if prompt[-1].get("role") != "user":
        return "prompt_does_not_end_with_user"
    for reply in (chosen, rejected):
        if not isinstance(reply, list) or len(reply) != 1 or reply[0].get("role") != "assistant":
            return "reply_not_one_assistant_message"
        if not isinstance(reply[0].get("content"), str) or not reply[0]["content"].strip():
            return "empty_turn"
    if chosen[0]["content"] == rejected[0]["content"]:
        return "chosen_equals_rejected"
    problem = conversation_problem(prompt + chosen)
    return f"prompt_{problem}" if problem else None


# -------------------------------------------------------------------------------------------------------------
# Shapes for TRL


def fold_tools(messages: list[dict], tools: list | None) -> list[dict]:
    """Messages whose chat-template text equals the original's with `tools`, but with no free-form objects."""
    folded = []
    for message in messages:
        message = {k: v for k, v in message.items() if v is not None}
        if message.get("tool_calls"):
            calls = []
            for call in message["tool_calls"]:
                fn = call.get("function", call)
                arguments = fn["arguments"] if isinstance(fn["arguments"], str) else json.dumps(fn["arguments"], ensure_ascii=False)
                calls.append({"type": "function", "function": {"name": fn["name"], "arguments": arguments}})
            message["tool_calls"] = calls
        folded.append(message)
    if tools:
        system = folded[0]["content"] + "\n\n" if folded and folded[0]["role"] == "system" else ""
        header = system + TOOLS_HEADER + "".join("\n" + json.dumps(tool, ensure_ascii=False) for tool in tools) + "\n</tools>"
        folded = [{"role": "system", "content": header}] + [m for m in folded if m["role"] != "system"]
    return folded


def stable_fraction(text: str) -> float:
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


def prompt_key(prompt: list[dict]) -> str:
    """Held-out splits key on the last user turn, so one question never lands on both sides."""
    return prompt[-1]["content"].strip().lower()


# -------------------------------------------------------------------------------------------------------------
# Reports


class SourceReport:
    def __init__(self, name: str):
        self.name = name
        self.read = 0
        self.kept = 0
        self.heldout = 0
        self.dropped: dict[str, int] = {}
        self.examples: list[str] = []

    def drop(self, reason: str, location: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        if len(self.examples) < 5:
            self.examples.append(f"{location}: {reason}")

    def as_dict(self) -> dict:
        return {"read": self.read, "kept": self.kept, "heldout": self.heldout, "dropped": self.dropped,
                "examples_of_dropped": self.examples}


def read_conversations(source: BranchSource, on_malformed: str, report: SourceReport) -> Iterator[tuple[str, list[dict]]]:
    """(location, folded messages) of a conversational source; malformed records fail or are counted."""
    counts: dict = {}
    for location, record in iter_located_records(source, on_malformed, counts):
        report.read += 1
        try:
            if source.format == "glaive":  # two transcript columns, not a message list
                messages, tools = glaive_to_conversation(record)
            else:
                messages, tools = record_to_conversation(record, source.format, source.messages_field)
            messages = fold_tools(messages, tools)
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            if on_malformed == "fail":
                raise DataError(f"{location}: not a conversation ({type(err).__name__}: {err}); fix the record or "
                                f"set on_malformed: skip") from None
            report.drop("malformed_record", location)
            continue
        yield location, messages
        if source.max_records and report.read >= source.max_records:
            break
    for reason, count in counts.items():
        report.dropped[reason] = report.dropped.get(reason, 0) + count
        report.read += count
