"""The project's built-in principle-shaped dialogues (configs/dialogues/topics.yaml) and hedged rewrites.

Each topic holds a few phrasings of a question, a substantive answer (the answer first, one concrete number,
example or mechanism, then a relevant follow-up question) and optionally a second-turn answer. From them:

  * SFT conversations: every phrasing as a single-turn dialogue with the system prompt, the first phrasing
    once more without it, and a two-turn dialogue where the user accepts the follow-up ("Yes, please.") and
    the assistant goes on with `more`;
  * DPO pairs: the same prompts with the substantive answer as `chosen` and a hedged rewrite as `rejected`.
    The rewrites combine the behaviours the rubric penalises (needless refusal, "it depends" without saying
    on what, stacked disclaimers, deflection to a professional) around a vague paraphrase, so a model learns
    to prefer substance over hedging, not one fixed phrase.

`hedged_rewrite_of_answer` does the same for any good answer (a DPO source of format `hedged_rewrite` over
a conversational file): the hedges wrap the answer's first sentence, so the rejected reply keeps a little of
the substance and differs from the chosen one by its hedging and by all that it leaves out.

Topics are split into train and held-out by a stable hash of their id, so held-out prompts are never seen
in SFT or DPO training (and the pretraining corpus includes only the training topics).
"""

from __future__ import annotations

import hashlib
import random
import re
from pathlib import Path

from pydantic import Field

from genesis.chat import with_system_prompt
from genesis.config import StrictModel, config_root, load_config

# NOTE: fixed for the project, not per branch: the pretraining corpus includes the training topics'
# dialogues, so a held-out topic must be held out everywhere, in every run.
HELDOUT_FRACTION = 0.25

ACCEPT_FOLLOW_UPS = ["Yes, please.", "Sure, tell me.", "Yes! Go on.", "I'd like that.", "Please do."]

HEDGE_OPENERS = [
    "That's a great question, but it's hard to give a definitive answer.",
    "I'm not an expert on this, so please take what I say with a grain of salt.",
    "As an AI, I can't be completely sure about this.",
    "I'm not able to give a complete answer to that.",
    "There are many different opinions on this, and it's difficult to say.",
]
HEDGE_MIDDLES = [
    "It really depends on many factors.",
    "It depends on the situation and on a lot of different things.",
    "Everyone's situation is different, so it varies.",
    "There is no simple answer, as it depends on the context.",
]
HEDGE_VAGUE = [
    "In general, {topic} is a complex subject that people have studied in different ways.",
    "Generally speaking, there are various aspects to {topic}.",
    "Broadly, {topic} involves several things that can be complicated.",
]
HEDGE_CLOSERS = [
    "You may want to consult a professional or an expert for accurate information.",
    "I'd recommend doing your own research or asking a specialist.",
    "Please note that this is not professional advice.",
    "It's best to check with a qualified expert before drawing any conclusions.",
]


class Topic(StrictModel):
    id: str = Field(pattern=r"^[a-z0-9-]+$")
    questions: list[str] = Field(min_length=1)
    answer: str = Field(min_length=1)
    follow_up: str | None = None
    more: str | None = None


class TopicSet(StrictModel):
    topics: list[Topic] = Field(min_length=1)


def default_topics_path() -> Path:
    return config_root() / "dialogues" / "topics.yaml"


def load_topics(path: str | Path | None = None) -> list[Topic]:
    return load_config(TopicSet, path or default_topics_path()).topics


def is_heldout(topic_id: str, heldout_fraction: float = HELDOUT_FRACTION) -> bool:
    """Stable split: the same topic is held out on every machine and in every run."""
    bucket = int(hashlib.sha256(topic_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return bucket < heldout_fraction


def full_answer(topic: Topic) -> str:
    return topic.answer + (f" {topic.follow_up}" if topic.follow_up else "")


def _subject(topic: Topic) -> str:
    return "the question of " + topic.id.replace("-", " ")


def _hedged_around(core: str, rng: random.Random) -> str:
    """2–4 penalised behaviours around `core`: an opener, often an empty "it depends", then a closer."""
    parts = [rng.choice(HEDGE_OPENERS)]
    if rng.random() < 0.75:
        parts.append(rng.choice(HEDGE_MIDDLES))
    return " ".join(parts + [core, rng.choice(HEDGE_CLOSERS)])


def hedged_rewrite(topic: Topic, variant: int) -> str:
    """A hedging answer to the topic's question: 2–4 penalised behaviours around a vague paraphrase."""
    rng = random.Random(f"{topic.id}:{variant}")
    return _hedged_around(rng.choice(HEDGE_VAGUE).format(topic=_subject(topic)), rng)


_NOT_PROSE = re.compile(r"^\s*(```|\||    |(def|class|import|from|function|const|let|var|SELECT|#include)\b|<)")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s")
_MARKUP = re.compile(r"^[\s#>*_`\-\d.)]+")


def first_sentence(answer: str, limit: int = 200) -> str:
    """The answer's first sentence without leading list or heading marks, cut at a word within `limit`
    characters; empty when the answer does not open with a sentence of prose (code, a table, a greeting, an
    opener ending in a colon)."""
    first_line = answer.strip().split("\n", 1)[0]
    if _NOT_PROSE.match(first_line) or first_line.rstrip().endswith((":", ",", "{")):
        return ""  # code, a table, or an opener such as "Here are some tips:" that says nothing by itself
    text = _MARKUP.sub("", first_line).replace("**", "").replace("__", "").strip()
    if not text[:1].isalpha() or len(text.split()) < 4:
        return ""
    sentence = _SENTENCE_END.split(text, 1)[0].strip()
    if len(sentence) > limit:
        sentence = sentence[:limit].rsplit(" ", 1)[0].rstrip(",;:") + "..."
    return sentence


def hedged_rewrite_of_answer(answer: str, key: str) -> str:
    """A hedging reply in place of a good `answer`: the answer's first sentence (or, when it opens with no prose,
    a vague remark), wrapped in 2–4 penalised behaviours. `key` (the prompt) seeds the choices, so the same
    prompt always gets the same rewrite."""
    rng = random.Random(f"answer:{key}")
    gist = first_sentence(answer)
    return _hedged_around(gist or rng.choice(HEDGE_VAGUE).format(topic="this"), rng)


def sft_conversations(topics: list[Topic], system_prompt: str | None) -> list[dict]:
    """Conversations in the data kit's shape: {"messages": [...], "source": "builtin", "topic": id}."""
    conversations = []
    for topic in topics:
        for index, question in enumerate(topic.questions):
            turns = [{"role": "user", "content": question}, {"role": "assistant", "content": full_answer(topic)}]
            conversations.append({"messages": with_system_prompt(turns, system_prompt), "topic": topic.id})
            if index == 0 and system_prompt:
                # The same reply without a system prompt, so the behaviour does not hinge on the prompt.
                conversations.append({"messages": turns, "topic": topic.id})
            if topic.more and topic.follow_up and index == 0:
                second = turns + [{"role": "user", "content": ACCEPT_FOLLOW_UPS[len(conversations) % len(ACCEPT_FOLLOW_UPS)]},
                                  {"role": "assistant", "content": topic.more}]
                conversations.append({"messages": with_system_prompt(second, system_prompt), "topic": topic.id})
    return conversations


def dpo_pairs(topics: list[Topic], system_prompt: str | None) -> list[dict]:
    """TRL's conversational preference format: prompt (ends with the user turn), chosen, rejected."""
    pairs = []
    for topic in topics:
        for index, question in enumerate(topic.questions):
            pairs.append({
                "prompt": with_system_prompt([{"role": "user", "content": question}], system_prompt),
                "chosen": [{"role": "assistant", "content": full_answer(topic)}],
                "rejected": [{"role": "assistant", "content": hedged_rewrite(topic, index)}],
                "topic": topic.id,
            })
    return pairs


def split_topics(topics: list[Topic], heldout_fraction: float = HELDOUT_FRACTION) -> tuple[list[Topic], list[Topic]]:
    train = [t for t in topics if not is_heldout(t.id, heldout_fraction)]
    heldout = [t for t in topics if is_heldout(t.id, heldout_fraction)]
    return train, heldout
