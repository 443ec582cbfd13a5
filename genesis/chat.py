"""The chat format, defined once: ChatML with tool calls, its special tokens, and prompts ready to generate from.

Every stage that writes or reads a conversation uses this module: the data stage renders dialogues into
pretraining text (`render_chat`), the tokenizer carries `CHAT_TEMPLATE` (the same text, as Jinja), the branches
train and evaluate on it, and `genesis generate` / `genesis serve` prepare prompts with it
(`genesis_model.prompt`).

    <|im_start|>system\n{system}<|im_end|>\n
    <|im_start|>user\n{question}<|im_end|>\n
    <|im_start|>assistant\n{answer}<tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>\n
    <|im_start|>user\n<tool_response>{result}</tool_response><|im_end|>\n

Tools are listed in the system turn after `TOOLS_HEADER`.

Text from documents and users is always text: only the markers the template itself writes are control tokens.
A literal "<|im_end|>" in a user's question or a web page is encoded as its characters, on the SentencePiece
path and the Hugging Face path alike (ids identical). So every encoder works on segments
(`render_chat_segments`: a marker the template wrote, or text), never on the rendered string, where the two
cannot be told apart. Pretraining text is a plain string (Arrow text parts), so `render_chat_for_pretraining`
writes the template's markers as Unicode noncharacters (`MARKER_SENTINELS`), which
`data_prep.tokenizer.encode_documents` maps back to the marker ids.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from genesis.errors import DataError

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# NOTE: not "<unk>", "<s>", "</s>": those occur literally in real text (WikiText is full of "<unk>"), where
# SentencePiece reads them as plain characters but a Hugging Face tokenizer matches its special tokens, and
# the two would disagree. ChatML-style names do not occur in the corpus.
UNK, BOS, EOS, PAD = "<|unk|>", "<|bos|>", "<|endoftext|>", "<|pad|>"
TOOL_CALL, TOOL_CALL_END = "<tool_call>", "</tool_call>"
TOOL_RESPONSE, TOOL_RESPONSE_END = "<tool_response>", "</tool_response>"
TOOLS, TOOLS_END = "<tools>", "</tools>"
# Chat and tool markers: one token each when the template writes them (control symbols of the tokenizer, which
# SentencePiece never produces from text); written literally by a user or a document they are characters.
CHAT_TOKENS = [IM_START, IM_END, TOOL_CALL, TOOL_CALL_END, TOOL_RESPONSE, TOOL_RESPONSE_END, TOOLS, TOOLS_END]
TOOLS_HEADER = 'You can call these tools. Reply with <tool_call>{"name": ..., "arguments": ...}</tool_call>.\n<tools>'

# NOTE: U+FDD0..U+FDEF are Unicode noncharacters, "permanently reserved for process-internal use": they do not
# occur in interchanged text, and where one does (a malformed page) the data stage removes it from the document
# (`strip_marker_sentinels`; `render_chat_for_pretraining` does so for every message), so in a pretraining string
# a sentinel can only be a marker the template wrote.
MARKER_SENTINELS = {marker: chr(0xFDD0 + index) for index, marker in enumerate(CHAT_TOKENS)}
SENTINEL_MARKERS = {sentinel: marker for marker, sentinel in MARKER_SENTINELS.items()}
SENTINEL_PATTERN = re.compile("[\uFDD0-\uFDEF]")

# ChatML with {% generation %} markers around assistant replies (TRL's assistant-only loss reads them) and
# tool support: tools are listed in the system turn; tool calls and results use the marker tokens above.
# A model tuned with a system prompt carries it as the template's default (`chat_template(prompt)`), so plain
# transformers and llama.cpp users get the model's real behaviour: a conversation without a system turn gets
# the default; `apply_chat_template(..., default_system_prompt="")` renders none.
DEFAULT_SYSTEM_VARIABLE = "default_system_prompt"


def _jinja_string(text: str) -> str:
    """`text` as a single-quoted Jinja string literal (Jinja and llama.cpp's minja read these escapes)."""
    escaped = text.replace("\\", "\\\\").replace("'", "\\'")
    return "'" + escaped.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t") + "'"


def chat_template(default_system_prompt: str | None = None) -> str:
    """The Jinja chat template; with `default_system_prompt`, conversations without a system turn get that one."""
    default = default_system_prompt is not None
    return (
        ("{%- set default_system = " + DEFAULT_SYSTEM_VARIABLE + " if " + DEFAULT_SYSTEM_VARIABLE + " is defined "
         "else " + _jinja_string(default_system_prompt) + " %}" if default else "")
        + "{%- if tools %}"
        "{{- '<|im_start|>system\\n' }}"
        "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n\\n' }}"
        + ("{%- elif default_system %}{{- default_system + '\\n\\n' }}" if default else "")
        + "{%- endif %}"
        "{{- '" + TOOLS_HEADER.replace("\n", "\\n") + "' }}"
        "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
        "{{- '\\n</tools><|im_end|>\\n' }}"
        "{%- elif messages[0]['role'] == 'system' %}"
        "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
        + ("{%- elif default_system %}{{- '<|im_start|>system\\n' + default_system + '<|im_end|>\\n' }}"
           if default else "")
        + "{%- endif %}"
        "{%- for message in messages %}"
        "{%- if message['role'] == 'system' %}"
        "{%- elif message['role'] == 'assistant' %}"
        "{{- '<|im_start|>assistant\\n' }}"
        "{%- generation %}"
        "{%- if message.get('content') %}{{- message['content'] }}{%- endif %}"
        "{%- for call in message.get('tool_calls') or [] %}"
        "{%- set fn = call['function'] if call.get('function') else call %}"
        "{%- if fn['arguments'] is string %}"
        "{{- '<tool_call>{\"name\": ' + (fn['name'] | tojson) + ', \"arguments\": ' + fn['arguments'] + '}</tool_call>' }}"
        "{%- else %}"
        "{{- '<tool_call>' + ({'name': fn['name'], 'arguments': fn['arguments']} | tojson) + '</tool_call>' }}"
        "{%- endif %}"
        "{%- endfor %}"
        "{{- '<|im_end|>' }}"
        "{%- endgeneration %}"
        "{{- '\\n' }}"
        "{%- elif message['role'] == 'tool' %}"
        "{{- '<|im_start|>user\\n<tool_response>' + message['content'] + '</tool_response><|im_end|>\\n' }}"
        "{%- else %}"
        "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{%- endif %}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    )


def is_genesis_chat_template(template: str | None) -> bool:
    """Whether `template` is this module's (with or without a default system prompt), not someone else's."""
    if not template:
        return False
    if template == CHAT_TEMPLATE:
        return True
    prefix = "{%- set default_system = " + DEFAULT_SYSTEM_VARIABLE + " if "
    return template.startswith(prefix) and template.endswith(CHAT_TEMPLATE[-200:])


CHAT_TEMPLATE = chat_template()
_UNESCAPE = {"n": "\n", "r": "\r", "t": "\t"}


def template_default_system_prompt(template: str | None) -> str | None:
    """The default system prompt a Genesis chat template carries (`chat_template(prompt)`), or None."""
    prefix = "{%- set default_system = " + DEFAULT_SYSTEM_VARIABLE + " if " + DEFAULT_SYSTEM_VARIABLE + \
        " is defined else '"
    if not template or not template.startswith(prefix):
        return None
    chars, index = [], len(prefix)
    while template[index] != "'":  # the literal `_jinja_string` wrote, read back
        if template[index] == "\\":
            index += 1
            chars.append(_UNESCAPE.get(template[index], template[index]))
        else:
            chars.append(template[index])
        index += 1
    return "".join(chars)


def tool_call_json(name: str, arguments) -> str:
    """`{"name": ..., "arguments": ...}` as the chat template writes it; arguments given as a JSON string
    (the shape datasets store, since Arrow cannot hold free-form objects) are written verbatim."""
    if isinstance(arguments, str):
        return '{"name": ' + json.dumps(name, ensure_ascii=False) + ', "arguments": ' + arguments + "}"
    return json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)


@dataclass(frozen=True)
class ChatSegment:
    """A piece of a rendered conversation: a marker the template wrote (one control token), or text."""

    text: str
    marker: bool = False
    # Inside the template's {% generation %} block (an assistant's reply, its tool calls and its <|im_end|>): the
    # tokens an assistant-only loss trains on.
    assistant: bool = False


_MARKER_SPLIT = re.compile("(" + "|".join(re.escape(marker) for marker in CHAT_TOKENS) + ")")


def _folded_tools_block(content: str) -> tuple[str, str] | None:
    """(text before the header, the tool lines) when a system turn's content is a tools block folded into it
    (`branch.conversations.fold_tools`: what the template writes for `tools`, kept as a string because Arrow
    cannot hold free-form tool objects); None for any other content."""
    at = content.find(TOOLS_HEADER)
    suffix = "\n" + TOOLS_END
    if at < 0 or (at > 0 and not content[:at].endswith("\n\n")) or not content.endswith(suffix):
        return None
    tool_lines = content[at + len(TOOLS_HEADER): -len(suffix)]
    if not tool_lines.startswith("\n"):
        return None
    for line in tool_lines[1:].split("\n"):
        try:
            if not isinstance(json.loads(line), dict):
                return None
        except ValueError:
            return None
    return content[:at], tool_lines


def render_chat_segments(messages: list[dict], tools: list | None = None,
                         add_generation_prompt: bool = False) -> list[ChatSegment]:
    """A conversation as the chat template renders it, in segments: the markers the template wrote, and text
    (runs of text are merged, so a text segment is what lies between two markers or at a reply's edge).

    The template's own words (the tools header) keep their markers; everything from messages and tools is text,
    whatever it quotes. A system turn holding a folded tools block is rendered as the block it stands for."""
    segments: list[ChatSegment] = []

    def add(text: str, marker: bool = False, assistant: bool = False) -> None:
        if not text:
            return
        previous = segments[-1] if segments else None
        if not marker and previous is not None and not previous.marker and previous.assistant == assistant:
            segments[-1] = ChatSegment(previous.text + text, False, assistant)
        else:
            segments.append(ChatSegment(text, marker, assistant))

    def template_words(text: str) -> None:
        for piece in _MARKER_SPLIT.split(text):
            add(piece, marker=piece in CHAT_TOKENS)

    def tools_block(before_header: str, tool_lines: str) -> None:
        add(IM_START, marker=True)
        add("system\n" + before_header)
        template_words(TOOLS_HEADER)
        add(tool_lines + "\n")
        add(TOOLS_END, marker=True)
        add(IM_END, marker=True)
        add("\n")

    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
    folded = _folded_tools_block(system) if system is not None and not tools else None
    if tools:
        tools_block("" if system is None else system + "\n\n",
                    "".join("\n" + json.dumps(tool, ensure_ascii=False) for tool in tools))
    elif folded is not None:
        tools_block(*folded)
    elif system is not None:
        add(IM_START, marker=True)
        add("system\n" + system)
        add(IM_END, marker=True)
        add("\n")
    for message in messages:
        role = message["role"]
        if role == "system":
            continue
        add(IM_START, marker=True)
        if role == "assistant":
            add("assistant\n")
            add(message.get("content") or "", assistant=True)
            for call in message.get("tool_calls") or []:
                fn = call.get("function", call)
                add(TOOL_CALL, marker=True, assistant=True)
                add(tool_call_json(fn["name"], fn["arguments"]), assistant=True)
                add(TOOL_CALL_END, marker=True, assistant=True)
            add(IM_END, marker=True, assistant=True)
        elif role == "tool":
            add("user\n")
            add(TOOL_RESPONSE, marker=True)
            add(message["content"])
            add(TOOL_RESPONSE_END, marker=True)
            add(IM_END, marker=True)
        else:
            add(role + "\n" + message["content"])
            add(IM_END, marker=True)
        add("\n")
    if add_generation_prompt:
        add(IM_START, marker=True)
        add("assistant\n")
    return segments


def render_chat(messages: list[dict], tools: list | None = None, add_generation_prompt: bool = False) -> str:
    """ChatML text of a conversation; the same string the tokenizer's chat template produces. For reading, not
    for encoding: in the string a quoted marker and the template's are the same characters."""
    return "".join(segment.text for segment in render_chat_segments(messages, tools, add_generation_prompt))


def strip_marker_sentinels(text: str) -> str:
    """`text` without the code points that stand for template markers in pretraining text (and the rest of their
    reserved range): what a document or a user wrote can never become a marker."""
    return SENTINEL_PATTERN.sub("", text)


def sentinel_text(segments: list[ChatSegment]) -> str:
    """Segments as one string with each marker written as its sentinel and the sentinels' code points removed
    from the text: `data_prep.tokenizer.encode_documents` turns it into the ids the segments stand for."""
    return "".join(MARKER_SENTINELS[segment.text] if segment.marker else strip_marker_sentinels(segment.text)
                   for segment in segments)


def render_chat_for_pretraining(messages: list[dict], tools: list | None = None) -> str:
    """A conversation as pretraining text (the data stage's Arrow text parts): `render_chat`'s string with the
    template's markers as sentinels, which `data_prep.tokenizer.encode_documents` encodes as the marker ids."""
    return sentinel_text(render_chat_segments(messages, tools))


def encode_chat(tokenizer, messages: list[dict], tools: list | None = None, add_generation_prompt: bool = False,
                assistant_mask: bool = False, **template_kwargs):
    """Token ids of a conversation for a Hugging Face tokenizer: the template's markers by id, every text segment
    encoded as text (`split_special_tokens`), so a quoted "<|im_end|>" or "<|endoftext|>" is its characters.
    The ids equal `data_prep.tokenizer.encode_documents` on `render_chat_for_pretraining`'s string.

    With `assistant_mask`, returns (ids, mask) where mask[i] is 1 for the tokens of the template's
    {% generation %} block. A tokenizer with another chat template (an imported model's) is encoded by its own
    `apply_chat_template` (with `template_kwargs`): its markers are not known here."""
    template = getattr(tokenizer, "chat_template", None)
    if not is_genesis_chat_template(template):
        encoded = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                                tokenize=True, return_dict=True,
                                                return_assistant_tokens_mask=assistant_mask, **template_kwargs)
        ids = list(encoded["input_ids"])
        return (ids, list(encoded["assistant_masks"])) if assistant_mask else ids
    # As the template does: a conversation without a system turn gets the template's default system prompt, unless
    # the caller sets `default_system_prompt` ('' for none).
    default_system = template_kwargs.get(DEFAULT_SYSTEM_VARIABLE, template_default_system_prompt(template))
    if default_system and not (messages and messages[0]["role"] == "system"):
        messages = [{"role": "system", "content": default_system}] + list(messages)
    segments = render_chat_segments(messages, tools, add_generation_prompt)
    texts = [segment.text for segment in segments if not segment.marker]
    encoded_texts = iter(tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
                         if texts else [])
    ids: list[int] = []
    mask: list[int] = []
    for segment in segments:
        if segment.marker:
            marker_id = tokenizer.convert_tokens_to_ids(segment.text)
            if marker_id is None or marker_id == tokenizer.unk_token_id:
                raise DataError(f"{getattr(tokenizer, 'name_or_path', 'tokenizer')}: no {segment.text} token, but a "
                                f"Genesis chat template; use the tokenizer of the data the model was trained on")
            piece = [marker_id]
        else:
            piece = list(next(encoded_texts))
        ids += piece
        mask += [int(segment.assistant)] * len(piece)
    return (ids, mask) if assistant_mask else ids


def record_to_conversation(record: dict, format: str, messages_field: str = "messages") -> tuple[list[dict], list | None]:
    """A conversation-shaped record as (messages, tools); KeyError/TypeError/ValueError mean it is malformed."""
    if format == "xlam":
        # Salesforce xLAM: `query`, and `answers` / `tools` as JSON strings.
        calls = [{"type": "function", "function": call} for call in json.loads(record["answers"])]
        tools = [{"type": "function", "function": tool} for tool in json.loads(record["tools"])]
        return [{"role": "user", "content": record["query"]},
                {"role": "assistant", "content": "", "tool_calls": calls}], tools
    messages = record[messages_field]
    if isinstance(messages, str):  # some sets (Orca AgentInstruct) store the conversation as a JSON string
        messages = json.loads(messages)
    if format == "sharegpt":  # {"from": "human"|"gpt"|"system"|"tool", "value": ...}
        roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
                 "tool": "tool", "function_response": "tool"}
        messages = [{"role": roles[m["from"]], "content": m["value"]} for m in messages]
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise ValueError(f"field '{messages_field}' is not a list of messages")
    tools = record.get("tools") if format == "function_calling" else None
    if isinstance(tools, str):
        tools = json.loads(tools)
    return messages, tools


def as_messages(prompt):
    """A prompt given as text becomes one user message; messages pass through."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def with_system_prompt(messages: list[dict], system_prompt: str | None) -> list[dict]:
    """Give a conversation the principles' system prompt unless it brings its own."""
    if not system_prompt or not isinstance(messages, list):
        return messages  # not a list of messages: `preference_problem` names it
    if messages and isinstance(messages[0], dict) and messages[0].get("role") == "system":
        return messages
    return [{"role": "system", "content": system_prompt}] + messages
