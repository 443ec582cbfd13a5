"""What each branch writes to eval.json: did SFT teach the chat format, and did DPO move the model toward
curious answers and away from hedging?

preference_accuracy   share of held-out pairs whose implicit reward prefers the chosen reply, where the
                      implicit reward of a reply is log π_model(reply | prompt) − log π_base(reply | prompt)
                      and π_base is the milestone the branch grew from. One reference for both stages, so the
                      SFT parent and the DPO child are measured on the same scale (with the SFT model as its
                      own reference, the SFT reward would be identically zero).
preference_accuracy_length_normalized
                      the same with each reply's log-ratio divided by its token count: the implicit reward of
                      length-normalised DPO (loss `sigmoid_norm`, the recipes' choice), which is what that loss
                      raises. The summed reward can favour length alone: where SFT raises every assistant-style
                      token's log-ratio, the longer reply (usually the chosen one) gains the most.
reward_accuracy_vs_sft (DPO only; also _length_normalized)
                      the same with the SFT parent as the reference, which is DPO's own implicit reward and
                      what TRL reports as rewards/accuracies on training batches: the share of held-out pairs
                      that DPO itself moved toward the chosen reply. Compared with 0.5, not with the SFT figure.
logprob_accuracy      share where the model itself gives the chosen reply the higher total log-probability
                      (no reference): stricter, since chosen replies are longer.
format_adherence      share of sampled replies to held-out prompts that are one assistant turn: the reply
                      stops at <|im_end|> within the token limit and never opens another turn; `ended` counts
                      how the replies ended and `format_failures` shows the ones that did not adhere. With
                      `replies_per_prompt` > 1 each prompt is sampled several times: one sampling of 100
                      prompts reads 0.92-0.98 on the same model (BENCHMARKS.md).
hedging_score         mean rubric hedging of those sampled replies (lower is better); curiosity_score the
                      mean rubric curiosity (higher is better).
format_check          SFT's and DPO's format adherence, the drop from one to the other and whether it is more
                      than `max_format_drop` (`flagged`): DPO has cost format adherence in every measured run,
                      and a flagged model is kept from the registry's @latest and @champion.
"""

from __future__ import annotations

from pathlib import Path

import torch

from branch.config import EvalRecipe
from branch.rubric import score_reply
from genesis.chat import EOS, IM_END, IM_START, encode_chat



def _ids(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    # What users and data wrote is text, quoted markers included; only the template's markers are control ids.
    return encode_chat(tokenizer, messages, add_generation_prompt=add_generation_prompt)


def reply_token_ids(tokenizer, prompt: list[dict], reply: list[dict]) -> tuple[list[int], int]:
    """(full ids, index where the reply starts): the reply's tokens run through its <|im_end|>."""
    prompt_ids = _ids(tokenizer, prompt, add_generation_prompt=True)
    full = _ids(tokenizer, prompt + reply, add_generation_prompt=False)
    if full[: len(prompt_ids)] != prompt_ids:
        raise ValueError("chat template is not prefix-stable: the prompt's ids differ inside the full conversation")
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    end = full.index(im_end, len(prompt_ids)) + 1 if im_end in full[len(prompt_ids):] else len(full)
    return full[:end], len(prompt_ids)


@torch.inference_mode()
def sequence_logprob(model, ids: list[int], start: int, device: str) -> float:
    tokens = torch.tensor([ids], device=device)
    logits = model(tokens).logits[0, start - 1 : -1].float()
    targets = tokens[0, start:]
    return float(torch.log_softmax(logits, -1).gather(-1, targets[:, None]).sum())


# A reply's score: (total log-probability, token count). A pair's: (chosen's, rejected's).
ReplyScore = tuple[float, int]


def pair_logprobs(model_dir: Path, tokenizer, pairs: list[dict], device: str) -> list[tuple[ReplyScore, ReplyScore]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).to(device).eval()
    max_len = model.config.max_position_embeddings
    scores = []
    for pair in pairs:
        row = []
        for key in ("chosen", "rejected"):
            ids, start = reply_token_ids(tokenizer, pair["prompt"], pair[key])
            ids = ids[:max_len]
            row.append((sequence_logprob(model, ids, start, device), len(ids) - start) if start < max_len else (0.0, 0))
        scores.append((row[0], row[1]))
    del model
    return scores


def preference_metrics(model_scores, base_scores) -> dict:
    """Accuracies over pairs of ((chosen logp, tokens), (rejected logp, tokens)) for the model and the base."""

    def share(wins: int) -> float:
        return wins / len(model_scores) if model_scores else float("nan")

    summed = normalized = raw = 0
    for ((mc, nc), (mr, nr)), ((bc, _), (br, _)) in zip(model_scores, base_scores):
        summed += (mc - bc) - (mr - br) > 0
        normalized += (mc - bc) / max(nc, 1) - (mr - br) / max(nr, 1) > 0
        raw += mc > mr
    return {"preference_accuracy": share(summed), "preference_accuracy_length_normalized": share(normalized),
            "logprob_accuracy": share(raw)}


def sample_replies(model_dir: Path, tokenizer, prompts: list[list[dict]], recipe: EvalRecipe,
                   device: str) -> list[list[dict]]:
    """Sample `recipe.replies_per_prompt` replies per prompt with the native KV-cache generator and record how
    each one ended. `recipe.batch_size` prompts are decoded together, one decode step for the whole batch (the
    small recipe's whole evaluation on an H200: 68 s batched, 283 s one reply at a time). Replica r of batch b
    samples with seed `recipe.seed + r + b`, so replica r is what a one-reply evaluation with `seed: seed + r`
    samples."""
    from genesis_model.generate import Generator, SamplingConfig
    from genesis_model.inference import load_hf

    # NOTE: on a GPU the replies are sampled as `genesis serve` samples them: bf16 weights, the decode step
    # compiled as a CUDA graph (bench/generate.py measures that path); on the CPU in fp32, uncompiled.
    on_gpu = torch.device(device).type == "cuda"
    model = load_hf(model_dir, dtype=torch.bfloat16 if on_gpu else torch.float32, device=device).model
    context = model.config.max_seq_len
    im_start, im_end = tokenizer.convert_tokens_to_ids(IM_START), tokenizer.convert_tokens_to_ids(IM_END)
    eos = tokenizer.convert_tokens_to_ids(EOS)
    how_ended = {im_end: "im_end", eos: "eos", im_start: "opened_new_turn"}
    prompt_ids = [_ids(tokenizer, prompt, add_generation_prompt=True) for prompt in prompts]
    replies = [[{"text": "", "ended": "prompt_too_long"}] * recipe.replies_per_prompt for _ in prompts]
    # Similar lengths together: a batch's rows share the context left after its longest prompt.
    fitting = sorted((i for i, ids in enumerate(prompt_ids) if len(ids) < context - 1),
                     key=lambda i: len(prompt_ids[i]))
    if not fitting:
        return replies
    cache_len = min(context, len(prompt_ids[fitting[-1]]) + recipe.max_new_tokens)
    generator = Generator(model, max_seq_len=cache_len, batch_size=min(recipe.batch_size, len(fitting)),
                          compile_decode=on_gpu)
    for replica in range(recipe.replies_per_prompt):
        for batch_index, start in enumerate(range(0, len(fitting), generator.batch_size)):
            batch = fitting[start: start + generator.batch_size]
            sampling = SamplingConfig(max_new_tokens=recipe.max_new_tokens, temperature=recipe.temperature,
                                      top_k=recipe.top_k or None, top_p=recipe.top_p,
                                      seed=recipe.seed + replica + batch_index)
            new_ids = generator.generate_batch([prompt_ids[i] for i in batch], sampling, stop_ids=set(how_ended))
            for index, new in zip(batch, new_ids):
                text = tokenizer.decode([t for t in new if t not in how_ended], skip_special_tokens=False)
                replies[index][replica] = {"text": text.strip(), "ended": how_ended.get(new[-1], "length")}
    return replies


FORMAT_FAILURES_KEPT = 20
SHOWN_CHARS = 240


def _adheres(reply: dict) -> bool:
    return reply["ended"] == "im_end" and bool(reply["text"])


def reply_metrics(replies_per_prompt: list[list[dict]], prompts: list[list[dict]]) -> dict:
    """Format, hedging and curiosity over all sampled replies (each prompt's replies, `sample_replies`).
    `format_failures` keeps each non-adherent reply's prompt, how it ended and its last characters (up to 20
    of them), so a reading below target shows whether the model looped, wrote a legitimately long answer into
    the token limit, or closed with the wrong token."""
    replies = [reply for own in replies_per_prompt for reply in own]
    prompts = [prompt for prompt, own in zip(prompts, replies_per_prompt) for _ in own]
    n = len(replies)
    adherent = sum(_adheres(r) for r in replies)
    scores = [score_reply(r["text"], p[-1]["content"]) for r, p in zip(replies, prompts)]
    return {
        "format_adherence": adherent / n if n else float("nan"),
        "hedging_score": sum(s.hedging for s in scores) / n if n else float("nan"),
        "curiosity_score": sum(s.curiosity for s in scores) / n if n else float("nan"),
        "mean_reply_chars": sum(len(r["text"]) for r in replies) / n if n else float("nan"),
        "ended": {reason: sum(r["ended"] == reason for r in replies) for reason in sorted({r["ended"] for r in replies})},
        "format_failures": [
            {"prompt": p[-1]["content"][:SHOWN_CHARS], "ended": r["ended"] if r["text"] else f"{r['ended']}, empty",
             "reply_end": r["text"][-SHOWN_CHARS:]}
            for r, p in zip(replies, prompts) if not _adheres(r)][:FORMAT_FAILURES_KEPT],
    }


def format_check(sft_adherence: float, dpo_adherence: float, max_drop: float) -> dict:
    """Did DPO cost the format SFT taught? `flagged` when DPO's adherence is more than `max_drop` below SFT's."""
    drop = round(sft_adherence - dpo_adherence, 6)
    return {"sft": sft_adherence, "dpo": dpo_adherence, "drop": drop, "max_drop": max_drop,
            "flagged": bool(drop > max_drop)}


def evaluate_branch(base_dir: Path, sft_dir: Path, dpo_dir: Path, heldout_pairs: list[dict],
                    heldout_prompts: list[list[dict]], recipe: EvalRecipe, device: str) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(sft_dir))
    pairs = heldout_pairs[: recipe.max_pairs]
    prompts = heldout_prompts[: recipe.max_prompts]
    base_scores = pair_logprobs(base_dir, tokenizer, pairs, device)
    result: dict = {"heldout_pairs": len(pairs), "heldout_prompts": len(prompts)}
    replies, scores = {}, {}
    for stage, model_dir in (("sft", sft_dir), ("dpo", dpo_dir)):
        stage_scores = scores[stage] = pair_logprobs(model_dir, tokenizer, pairs, device)
        replies[stage] = sample_replies(model_dir, tokenizer, prompts, recipe, device)
        result[stage] = {**preference_metrics(stage_scores, base_scores), **reply_metrics(replies[stage], prompts)}
        by_source: dict[str, list] = {}
        for pair, score, base in zip(pairs, stage_scores, base_scores):
            by_source.setdefault(pair.get("source", "unknown"), []).append((score, base))
        by_source_metrics = {name: preference_metrics([s for s, _ in rows], [b for _, b in rows])
                             for name, rows in sorted(by_source.items())}
        for key in ("preference_accuracy", "preference_accuracy_length_normalized"):
            result[stage][f"{key}_by_source"] = {name: m[key] for name, m in by_source_metrics.items()}
    dpo_vs_sft = preference_metrics(scores["dpo"], scores["sft"])
    result["dpo"]["reward_accuracy_vs_sft"] = dpo_vs_sft["preference_accuracy"]
    result["dpo"]["reward_accuracy_vs_sft_length_normalized"] = dpo_vs_sft["preference_accuracy_length_normalized"]
    result["format_check"] = format_check(result["sft"]["format_adherence"], result["dpo"]["format_adherence"],
                                          recipe.max_format_drop)
    result["samples"] = [
        {"prompt": prompt[-1]["content"], "sft": sft[0]["text"], "dpo": dpo[0]["text"]}
        for prompt, sft, dpo in list(zip(prompts, replies["sft"], replies["dpo"]))[: recipe.samples]
    ]
    return result
