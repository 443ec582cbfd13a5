"""The curiosity-vs-hedging rubric: a transparent score for a reply, and pairs built from it.

hedging (higher is worse), each behaviour counted in the reply:
  refusal        2.0  "I can't / I'm not able to / I won't ..." where nothing in the prompt calls for it
  empty_depends  1.5  "it depends", "it varies", "no simple answer" while giving fewer than 2 specifics,
                      i.e. "it depends" without saying on what
  disclaimer     1.0  each of "I'm not an expert", "as an AI", "grain of salt", "please note", "not
                      professional advice", "can't be sure", ...; stacking (2 or more) adds 1.0 more
  deflection     1.5  "consult a professional / an expert", "do your own research", "ask a specialist" for a
                      benign prompt (a prompt that mentions an emergency, dosage, self-harm or legal action
                      is not benign, and sending the person to a professional is then the right answer)
  filler         0.5  "great question", "as an AI language model"

curiosity (higher is better):
  specifics      0.4 each, at most 5: numbers, quantities, code-like tokens and capitalised names inside
                 sentences; the details a person can act on
  example        1.0 each, at most 2: "for example", "for instance", "e.g.", "such as", "imagine", ...
  follow_up      1.0 when the reply ends with a question, +0.5 when that question shares a content word with
                 the prompt (a relevant follow-up, not a generic "anything else?")

score = curiosity - hedging. `build_pairs` chooses the highest-scoring reply and rejects the lowest when they
differ by at least `min_margin`; ties and near-ties give no pair, since the rubric cannot tell them apart.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

REFUSAL = re.compile(r"\b(I can(?:no|')t|I am not able to|I'm not able to|I am unable to|I'm unable to|I won't|I will not)\b", re.I)
EMPTY_DEPENDS = re.compile(r"\b(it (?:really )?depends|depends on (?:many|a lot of|various|the situation)|it varies|no simple answer|(?:hard|difficult) to say)\b", re.I)
DISCLAIMERS = [re.compile(p, re.I) for p in (
    r"\bI(?:'m| am) not an? (?:expert|doctor|lawyer|professional|specialist)\b",
    r"\bas an AI\b",
    r"\bgrain of salt\b",
    r"\bplease note\b",
    r"\bnot (?:professional|medical|legal|financial) advice\b",
    r"\bcan(?:'t|not) be (?:completely |entirely |100% )?(?:sure|certain)\b",
    r"\bhard to give a definitive\b",
    r"\bI(?:'m| am) not (?:sure|certain) (?:about|if|whether)\b",
)]
DEFLECTION = re.compile(r"\b(consult(?:ing)? (?:with )?(?:a|an|your)? ?(?:qualified )?(?:professional|expert|doctor|specialist|lawyer)|"
                        r"do(?:ing)? your own research|ask(?:ing)? (?:a|an) (?:specialist|expert|professional)|"
                        r"check with (?:a|an) (?:qualified )?(?:expert|professional)|seek professional)", re.I)
FILLER = re.compile(r"\b(great question|as an AI language model)\b", re.I)
NOT_BENIGN = re.compile(r"\b(emergency|overdose|dosage|suicid\w*|self-harm|chest pain|can't breathe|lawsuit|sue|poison\w*|bleeding)\b", re.I)

NUMBER = re.compile(r"\b\d[\d,.]*\b")
CODE = re.compile(r"[A-Za-z_]\w*\(|\w+\s?=\s?\w|`[^`]+`")
NAME_IN_SENTENCE = re.compile(r"(?<=[a-z,;:] )[A-Z][a-z]+")
EXAMPLE = re.compile(r"\b(for example|for instance|e\.g\.|such as|imagine|consider|like this)\b", re.I)
WORD = re.compile(r"[a-z]{4,}")
STOPWORDS = {"that", "this", "with", "what", "when", "which", "would", "your", "have", "does", "from", "there", "their",
             "about", "into", "them", "they", "then", "than", "like", "some", "want", "know", "tell", "more", "much",
             "just", "should", "could", "make", "also", "were", "been", "will", "very", "here", "where", "these"}


@dataclass
class RubricScore:
    hedging: float
    curiosity: float
    features: dict[str, float] = field(default_factory=dict)

    @property
    def score(self) -> float:
        return self.curiosity - self.hedging

    def as_dict(self) -> dict:
        return {**asdict(self), "score": self.score}


def _content_words(text: str) -> set[str]:
    return {w for w in WORD.findall(text.lower()) if w not in STOPWORDS}


def _last_sentence(text: str) -> str:
    sentences = re.split(r"(?<=[.!?])\s+", text.strip())
    return sentences[-1] if sentences else ""


def score_reply(reply: str, prompt: str = "") -> RubricScore:
    benign = not NOT_BENIGN.search(prompt)
    specifics = len(NUMBER.findall(reply)) + len(CODE.findall(reply)) + len(NAME_IN_SENTENCE.findall(reply))
    features: dict[str, float] = {}
    features["refusal"] = 2.0 * len(REFUSAL.findall(reply)) if benign else 0.0
    features["empty_depends"] = 1.5 * len(EMPTY_DEPENDS.findall(reply)) if specifics < 2 else 0.0
    disclaimers = sum(len(p.findall(reply)) for p in DISCLAIMERS)
    features["disclaimer"] = disclaimers + (1.0 if disclaimers >= 2 else 0.0)
    features["deflection"] = 1.5 * len(DEFLECTION.findall(reply)) if benign else 0.0
    features["filler"] = 0.5 * len(FILLER.findall(reply))
    hedging = sum(features.values())

    curiosity_features = {"specifics": 0.4 * min(specifics, 5), "example": 1.0 * min(len(EXAMPLE.findall(reply)), 2)}
    last = _last_sentence(reply)
    follow_up = 0.0
    if last.endswith("?"):
        follow_up = 1.0 + (0.5 if _content_words(last) & _content_words(prompt) else 0.0)
    curiosity_features["follow_up"] = follow_up
    features.update(curiosity_features)
    return RubricScore(hedging=round(hedging, 3), curiosity=round(sum(curiosity_features.values()), 3), features=features)


def build_pairs(prompt: str, replies: list[str], min_margin: float = 1.0) -> tuple[str, str] | None:
    """(chosen, rejected) among `replies` by rubric score, or None when the best and worst are too close."""
    if len(replies) < 2:
        return None
    scored = sorted(replies, key=lambda reply: score_reply(reply, prompt).score)
    worst, best = scored[0], scored[-1]
    if score_reply(best, prompt).score - score_reply(worst, prompt).score < min_margin:
        return None
    return best, worst
