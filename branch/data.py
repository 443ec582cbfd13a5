"""A branch's data: SFT conversations and DPO pairs from the recipe's sources, checked, split and reported.

    assemble_data(config, tokenizer) -> BranchData   (the pipeline's data stage writes it to <branch>/data/)

Built-in principle dialogues come first; every configured source is read with its problems counted by reason
(the report), conversations and pairs longer than the recipe's max_length are dropped, and DPO pairs are split
into training and held-out by a stable hash of their prompt, so one question never sits on both sides.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from branch.config import BranchConfig
from branch.conversations import (SourceReport, conversation_problem, explicit_prompt_pair, iter_located_records,
                                  preference_problem, prompt_key, read_conversations, stable_fraction)
from branch.rubric import build_pairs, score_reply
from genesis.chat import as_messages, encode_chat, with_system_prompt
from genesis.errors import DataError
from genesis.principles import load_principles
from genesis.principles.dialogues import dpo_pairs, hedged_rewrite_of_answer, load_topics, sft_conversations, split_topics


@dataclass
class BranchData:
    sft: list[dict] = field(default_factory=list)
    dpo_train: list[dict] = field(default_factory=list)
    dpo_heldout: list[dict] = field(default_factory=list)
    heldout_prompts: list[list[dict]] = field(default_factory=list)
    report: dict = field(default_factory=dict)


def system_prompt_of(config: BranchConfig) -> str:
    if config.system_prompt is not None:
        return config.system_prompt
    return load_principles(config.principles).system_prompt(config.system_prompt_style)


# -------------------------------------------------------------------------------------------------------------
# Data


def _token_length(tokenizer, messages: list[dict]) -> int:
    return len(encode_chat(tokenizer, messages))


def assemble_data(config: BranchConfig, tokenizer) -> BranchData:
    """Gather, check, split and report the branch's SFT conversations and DPO pairs."""
    system_prompt = system_prompt_of(config)
    data = BranchData()
    reports: dict[str, dict] = {"sft": {}, "dpo": {}}

    if config.builtin_dialogues:
        train_topics, heldout_topics = split_topics(load_topics())
        builtin_sft = [(f"topic {row['topic']}", row["messages"]) for row in sft_conversations(train_topics, system_prompt)]
        builtin_train = [{**p, "source": "builtin"} for p in dpo_pairs(train_topics, system_prompt)]
        builtin_heldout = [{**p, "source": "builtin"} for p in dpo_pairs(heldout_topics, system_prompt)]
    else:
        builtin_sft, builtin_train, builtin_heldout = [], [], []

    # SFT conversations
    report = SourceReport("builtin")
    candidates = [("builtin", loc, m) for loc, m in builtin_sft]
    report.read = len(builtin_sft)
    source_reports = {"builtin": report} if builtin_sft else {}
    for source in config.sft_sources:
        report = source_reports.setdefault(source.name, SourceReport(source.name))
        for location, messages in read_conversations(source, config.on_malformed, report):
            candidates.append((source.name, location, with_system_prompt(messages, system_prompt)))
    for name, location, messages in candidates:
        report = source_reports[name]
        problem = conversation_problem(messages)
        if problem is None and _token_length(tokenizer, messages) > config.sft.max_length:
            problem = "longer_than_max_length"
        if problem:
            report.drop(problem, location)
            continue
        report.kept += 1
        data.sft.append({"messages": messages, "source": name})
    reports["sft"] = {name: r.as_dict() for name, r in source_reports.items()}

    # DPO pairs
    source_reports = {}
    pairs: list[tuple[str, str, dict, bool | None]] = []  # (source, location, pair, fixed held-out side)
    if builtin_train:
        source_reports["builtin"] = SourceReport("builtin")
        source_reports["builtin"].read = len(builtin_train) + len(builtin_heldout)
        pairs += [("builtin", f"topic {p['topic']}", p, False) for p in builtin_train]
        pairs += [("builtin", f"topic {p['topic']}", p, True) for p in builtin_heldout]
    for source in config.dpo_sources:
        report = source_reports.setdefault(source.name, SourceReport(source.name))
        counts: dict = {}
        for location, record in iter_located_records(source, config.on_malformed, counts):
            report.read += 1
            pair = _pair_from_record(record, source, location, config.on_malformed, report)
            if pair is not None:
                pairs.append((source.name, location, {**pair, "prompt": with_system_prompt(pair["prompt"], system_prompt)}, None))
            if source.max_records and report.read >= source.max_records:
                break
        for reason, count in counts.items():
            report.dropped[reason] = report.dropped.get(reason, 0) + count
    seen_heldout_prompts: set[str] = set()
    for name, location, pair, heldout in pairs:
        report = source_reports[name]
        problem = preference_problem(pair)
        if problem is None:
            longest = max(_token_length(tokenizer, pair["prompt"] + pair[k]) for k in ("chosen", "rejected"))
            if longest > config.dpo.max_length:
                problem = "longer_than_max_length"
        if problem:
            report.drop(problem, location)
            continue
        row = {"prompt": pair["prompt"], "chosen": pair["chosen"], "rejected": pair["rejected"], "source": name}
        key = prompt_key(pair["prompt"])
        if heldout is None:
            heldout = stable_fraction(f"{config.seed}:{key}") < config.heldout_fraction
        report.kept += 1
        if heldout:
            report.heldout += 1
            data.dpo_heldout.append(row)
            if key not in seen_heldout_prompts:
                seen_heldout_prompts.add(key)
                data.heldout_prompts.append(pair["prompt"])
        else:
            data.dpo_train.append(row)
    reports["dpo"] = {name: r.as_dict() for name, r in source_reports.items()}

    if not data.sft:
        raise DataError("branch data: no usable SFT conversation; check sft_sources in the branch config and "
                        "data/report.json")
    if not data.dpo_train or not data.dpo_heldout:
        raise DataError("branch data: DPO needs training and held-out pairs; add dpo_sources or builtin_dialogues")
    # Interleave held-out prompts across sources (built-in ones first are otherwise all that is sampled).
    random.Random(config.seed).shuffle(data.heldout_prompts)
    random.Random(config.seed).shuffle(data.dpo_heldout)
    data.report = {"system_prompt": system_prompt, "sft": reports["sft"], "dpo": reports["dpo"],
                   "totals": {"sft": len(data.sft), "dpo_train": len(data.dpo_train),
                              "dpo_heldout": len(data.dpo_heldout), "heldout_prompts": len(data.heldout_prompts)}}
    return data


def _pair_from_record(record: dict, source, location: str, on_malformed: str, report: SourceReport) -> dict | None:
    try:
        if source.format == "preference":
            return explicit_prompt_pair(record.get("prompt"), record["chosen"], record["rejected"])
        if source.format == "hedged_rewrite":
            # a conversation: {"messages": [..., user, assistant]} → its final answer against a hedged rewrite
            messages = record[source.messages_field]
            prompt, answer = messages[:-1], messages[-1]
            if answer["role"] != "assistant" or not isinstance(answer["content"], str):
                raise TypeError("last message (an assistant's text)")
            if not prompt or prompt[-1]["role"] != "user":
                raise TypeError("message before the answer (the user's)")
        else:
            # rubric: {"prompt": str | messages, "responses": [str, ...]} → best vs worst by the rubric
            prompt = as_messages(record["prompt"])
            responses = [r if isinstance(r, str) else r["content"] for r in record["responses"]]
    except (KeyError, TypeError, IndexError) as err:
        if on_malformed == "fail":
            raise DataError(f"{location}: not a {source.format} record (missing or wrong {err}); fix the record or "
                            f"set on_malformed: skip") from None
        report.drop("malformed_record", location)
        return None
    if source.format == "hedged_rewrite":
        answer = answer["content"].strip()
        # Only a good answer may stand for substance: long enough, and not hedging itself.
        if len(answer) < source.min_answer_chars:
            report.drop("answer_shorter_than_min_answer_chars", location)
            return None
        question = prompt[-1]["content"]
        answer_score = score_reply(answer, question)
        if answer_score.hedging > 0:
            report.drop("answer_hedges", location)
            return None
        chosen, rejected = answer, hedged_rewrite_of_answer(answer, prompt_key(prompt))
        rejected_score = score_reply(rejected, question)
        # NOTE: where the prompt is not benign (a legal or medical emergency) the rubric does not count a
        # referral to a professional as hedging, and the pair would teach the model to avoid the right answer.
        if rejected_score.hedging == 0 or rejected_score.score >= answer_score.score:
            report.drop("rubric_does_not_prefer_the_answer", location)
            return None
    else:
        built = build_pairs(prompt[-1]["content"], responses, source.min_margin)
        if built is None:
            report.drop("rubric_margin_too_small", location)
            return None
        chosen, rejected = built
    return {"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}


def write_jsonl(path: Path, rows: list) -> str:
    """Write atomically; return the sha256 of the content (the data digest recorded in lineage)."""
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return hashlib.sha256(text.encode()).hexdigest()


def write_json(path: Path, value) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, ensure_ascii=False, default=str))
    os.replace(tmp, path)
