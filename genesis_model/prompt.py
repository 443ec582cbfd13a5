"""Turning a user's prompt into the token ids a model continues, shared by `genesis generate` and `genesis serve`.

Chat mode wraps the prompt in the tokenizer's chat template with a system prompt: the one given, else the one
the branch model was tuned with (its stage marker), else the one rendered from configs/principles.yaml. The
prompt is encoded as text (`genesis.chat.encode_chat`): a user typing "<|im_end|>" cannot close their turn.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from genesis.chat import DEFAULT_SYSTEM_VARIABLE, IM_END, encode_chat
from genesis.errors import GenesisError
from genesis.run_dir import read_stage


@dataclass
class PreparedPrompt:
    ids: list[int]
    stop_ids: set[int]
    system_prompt: str | None


def system_prompt_for(model_source: str, requested: str | None = None) -> str | None:
    """`requested` wins ('' means none); then the prompt a branch model was tuned with; then the principles'."""
    if requested is not None:
        return requested or None
    tuned_with = read_stage(Path(model_source)).get("system_prompt") if Path(model_source).is_dir() else None
    if tuned_with:
        return tuned_with
    from genesis.principles import load_principles

    return load_principles().system_prompt("full")


def prepare_prompt(tokenizer, prompt: str, chat: bool, model_source: str, system: str | None = None) -> PreparedPrompt:
    if not chat:
        # split_special_tokens: a prompt quoting "<|endoftext|>" is those characters, not the end of the text.
        return PreparedPrompt(list(tokenizer.encode(prompt, add_special_tokens=False, split_special_tokens=True)),
                              {i for i in (tokenizer.eos_token_id,) if i is not None}, None)
    if not tokenizer.chat_template:
        raise GenesisError(f"{model_source}: tokenizer has no chat template; chat mode needs one (use plain text)")
    system_prompt = system_prompt_for(model_source, system)
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else [])
    messages.append({"role": "user", "content": prompt})
    # A directory's template may carry the prompt the model was tuned with as its default; the prompt chosen here
    # (none included) is the one the user asked for, so that default is switched off (Genesis's own rendering
    # never adds it; another model's template is given the variable).
    ids = encode_chat(tokenizer, messages, add_generation_prompt=True, **{DEFAULT_SYSTEM_VARIABLE: ""})
    stop_ids = {tokenizer.convert_tokens_to_ids(IM_END), tokenizer.eos_token_id}
    return PreparedPrompt(list(ids), {i for i in stop_ids if i is not None}, system_prompt)
