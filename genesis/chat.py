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
"""

from __future__ import annotations

import json

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# NOTE: not "<unk>", "<s>", "</s>": those occur literally in real text (WikiText is full of "<unk>"), where
# SentencePiece reads them as plain characters but a Hugging Face tokenizer matches its special tokens, and
# the two would disagree. ChatML-style names do not occur in the corpus.
UNK, BOS, EOS, PAD = "<|unk|>", "<|bos|>", "<|endoftext|>", "<|pad|>"
# Chat and tool markers: always one token each (user-defined symbols of the tokenizer).
CHAT_TOKENS = [IM_START, IM_END, "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<tools>",
               "</tools>"]
TOOLS_HEADER = 'You can call these tools. Reply with <tool_call>{"name": ..., "arguments": ...}</tool_call>.\n<tools>'

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


def tool_call_json(name: str, arguments) -> str:
    """`{"name": ..., "arguments": ...}` as the chat template writes it; arguments given as a JSON string
    (the shape datasets store, since Arrow cannot hold free-form objects) are written verbatim."""
    if isinstance(arguments, str):
        return '{"name": ' + json.dumps(name, ensure_ascii=False) + ', "arguments": ' + arguments + "}"
    return json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)


def render_chat(messages: list[dict], tools: list | None = None) -> str:
    """ChatML text of a conversation; the same string the tokenizer's chat template produces."""
    parts = []
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
    if tools:
        header = (system + "\n\n") if system else ""
        header += TOOLS_HEADER
        header += "".join("\n" + json.dumps(tool, ensure_ascii=False) for tool in tools)
        parts.append(f"<|im_start|>system\n{header}\n</tools><|im_end|>\n")
    elif system is not None:
        parts.append(f"<|im_start|>system\n{system}<|im_end|>\n")
    for message in messages:
        role = message["role"]
        if role == "system":
            continue
        if role == "assistant":
            body = message.get("content") or ""
            for call in message.get("tool_calls") or []:
                fn = call.get("function", call)
                body += "<tool_call>" + tool_call_json(fn["name"], fn["arguments"]) + "</tool_call>"
            parts.append(f"<|im_start|>assistant\n{body}<|im_end|>\n")
        elif role == "tool":
            parts.append(f"<|im_start|>user\n<tool_response>{message['content']}</tool_response><|im_end|>\n")
        else:
            parts.append(f"<|im_start|>{role}\n{message['content']}<|im_end|>\n")
    return "".join(parts)


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
