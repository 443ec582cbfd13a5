"""Milestone branches: principles, built-in dialogues, the hedging rubric, SFT/DPO data and a real branch."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from branch.config import BranchConfig
from branch.conversations import BranchSource, SourceReport, conversation_problem, fold_tools, read_conversations
from genesis.principles.dialogues import (HEDGE_CLOSERS, HEDGE_OPENERS, dpo_pairs, full_answer, hedged_rewrite, load_topics,
                                      sft_conversations, split_topics)
from genesis.principles import load_principles
from branch.rubric import NOT_BENIGN, build_pairs, score_reply
from genesis.config import REPO_ROOT, load_config
from genesis.errors import ConfigError, DataError

DATA = REPO_ROOT.parent / "shared" / "data"
TINY_BRANCH = REPO_ROOT / "configs" / "branch" / "tiny.yaml"


def genesis(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO_ROOT)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr[-2000:]
    return lines[0]


# ---------------------------------------------------------------------------------------------------------------
# Principles


def test_the_system_prompt_states_every_principle():
    principles = load_principles()
    full = principles.system_prompt("full")
    for principle in principles.principles:
        assert principle.description in full
    assert principles.system_prompt("brief") == "You are Genesis. Be helpful, curious, honest and not boring."


def test_a_principles_file_with_an_unknown_field_is_one_line(tmp_path):
    bad = tmp_path / "principles.yaml"
    bad.write_text("name: x\nprinciples:\n  - {name: kind, description: Be kind., tone: warm}\n")
    with pytest.raises(ConfigError) as err:
        load_principles(bad)
    message = str(err.value)
    assert str(bad) in message and "tone" in message and "\n" not in message


# ---------------------------------------------------------------------------------------------------------------
# Rubric


@pytest.mark.parametrize("reply, behaviour", [
    ("I can't help with that question.", "refusal"),
    ("It depends on many factors.", "empty_depends"),
    ("I'm not an expert, so take this with a grain of salt. Please note this is not professional advice.", "disclaimer"),
    ("You should consult a professional about how bread rises.", "deflection"),
    ("Great question! Bread rises.", "filler"),
])
def test_each_hedging_behaviour_is_penalised(reply, behaviour):
    score = score_reply(reply, "Why does bread rise?")
    assert score.features[behaviour] > 0 and score.hedging > 0


def test_stacked_disclaimers_cost_more_than_the_sum_of_single_ones():
    one = score_reply("Please note: yeast makes gas.").hedging
    two = score_reply("Please note: as an AI, yeast makes gas.").hedging
    assert two > 2 * one


def test_it_depends_with_specifics_is_not_hedging():
    specific = "It depends on temperature: at 25 C yeast doubles dough in about 90 minutes, at 5 C it takes 12 hours."
    assert score_reply(specific).features["empty_depends"] == 0


def test_sending_someone_to_a_professional_is_right_when_the_prompt_is_not_benign():
    reply = "Please consult a doctor right away."
    assert score_reply(reply, "What dosage of this drug is too much for my child?").features["deflection"] == 0
    assert score_reply(reply, "Why do onions make me cry?").features["deflection"] > 0


def test_curiosity_rewards_specifics_examples_and_a_relevant_follow_up():
    prompt = "How do tides work?"
    flat = score_reply("The Moon affects the water.", prompt)
    rich = score_reply("The Moon pulls the near ocean harder than Earth's centre, making two bulges; for example, "
                       "the Bay of Fundy rises 16 metres. Want to know why spring tides are bigger?", prompt)
    generic = score_reply("The Moon pulls the near ocean. Anything else?", prompt)
    assert rich.curiosity > flat.curiosity
    assert rich.features["example"] == 1.0 and rich.features["specifics"] > 0
    assert rich.features["follow_up"] == 1.5  # a question about tides: relevant
    assert generic.features["follow_up"] == 1.0  # a question, but a generic one


def test_pairs_choose_the_higher_scoring_reply_and_skip_near_ties():
    prompt = "Why is the sky blue?"
    good = "Air scatters blue light about 5.5 times more than red, for example at noon. Curious about sunsets and the sky?"
    hedged = "It depends on many factors. I'm not an expert. You may want to consult a professional."
    assert build_pairs(prompt, [hedged, good]) == (good, hedged)
    assert build_pairs(prompt, [good, good + " "]) is None
    assert build_pairs(prompt, [good]) is None


def test_preference_accuracy_reads_implicit_rewards_summed_and_per_token():
    from branch.evaluate import preference_metrics

    # (log-probability, tokens) of (chosen, rejected) under the model and under the base it grew from. The
    # long chosen reply gained 5 nats over 100 tokens (0.05 each); the short rejected one 1 nat over 10 (0.1).
    model = [((-95.0, 100), (-19.0, 10))]
    base = [((-100.0, 100), (-20.0, 10))]
    metrics = preference_metrics(model, base)
    assert metrics["preference_accuracy"] == 1.0  # summed: +5 > +1
    assert metrics["preference_accuracy_length_normalized"] == 0.0  # per token: 0.05 < 0.1
    assert metrics["logprob_accuracy"] == 0.0  # the model alone gives the short reply more probability
    # A pair whose per-token gain favours the chosen reply counts under both.
    model.append(((-40.0, 20), (-49.0, 10)))
    base.append(((-44.0, 20), (-50.0, 10)))
    metrics = preference_metrics(model, base)
    assert metrics["preference_accuracy"] == 1.0 and metrics["preference_accuracy_length_normalized"] == 0.5


def test_only_one_non_empty_turn_closed_by_im_end_adheres_to_the_chat_format_and_each_failure_is_shown():
    from branch.evaluate import reply_metrics

    prompts = [[{"role": "user", "content": f"question {i}"}] for i in range(3)]
    closed = {"text": "Water boils at 100 C at sea level.", "ended": "im_end"}
    replies = [[closed, closed],  # two replies per prompt: every reply counts
               [{"text": ("the song is the song " * 40).strip(), "ended": "length"}, closed],
               [{"text": "A reply closed by the document end token.", "ended": "eos"},
                {"text": "", "ended": "im_end"}]]
    metrics = reply_metrics(replies, prompts)
    assert metrics["format_adherence"] == 0.5
    assert metrics["ended"] == {"eos": 1, "im_end": 4, "length": 1}
    failures = metrics["format_failures"]
    assert [(f["prompt"], f["ended"]) for f in failures] == [
        ("question 1", "length"), ("question 2", "eos"), ("question 2", "im_end, empty")]
    assert failures[0]["reply_end"].endswith("the song is the song") and len(failures[0]["reply_end"]) <= 240


# ---------------------------------------------------------------------------------------------------------------
# Built-in dialogues


def test_the_built_in_set_has_a_few_hundred_conversations_and_a_stable_held_out_split():
    topics = load_topics()
    train, heldout = split_topics(topics)
    assert len(topics) >= 40 and 0 < len(heldout) < len(train)
    assert split_topics(topics) == (train, heldout)
    conversations = sft_conversations(topics, "You are Genesis.")
    assert len(conversations) >= 200
    assert any(len(c["messages"]) == 5 for c in conversations)  # two-turn follow-ups
    assert any(c["messages"][0]["role"] != "system" for c in conversations)  # and some without a system prompt
    assert all(conversation_problem(c["messages"]) is None for c in conversations)


def test_held_out_topics_stay_out_of_the_pretraining_corpus():
    from data_prep.builtin import dialog_texts

    corpus = "\n".join(dialog_texts())
    train, heldout = split_topics(load_topics())
    assert all(t.answer[:60] in corpus for t in train)
    assert not any(t.answer[:60] in corpus for t in heldout)


def test_every_hedged_rewrite_scores_below_its_original_on_the_rubric():
    topics = load_topics()
    for pair in dpo_pairs(topics, None):
        prompt = pair["prompt"][-1]["content"]
        chosen, rejected = score_reply(pair["chosen"][0]["content"], prompt), score_reply(pair["rejected"][0]["content"], prompt)
        assert rejected.hedging >= 2 and chosen.hedging == 0, pair["rejected"][0]["content"]
        assert chosen.score > rejected.score
    rewrites = {hedged_rewrite(t, i) for t in topics for i in range(3)}
    assert len(rewrites) > 100  # varied, not one fixed phrase
    assert {o for o in HEDGE_OPENERS if any(r.startswith(o) for r in rewrites)} == set(HEDGE_OPENERS)
    assert all(any(c in r for r in rewrites) for c in HEDGE_CLOSERS)
    assert all(full_answer(t).endswith(t.follow_up or "") for t in topics)


# ---------------------------------------------------------------------------------------------------------------
# Conversations and preference records


@pytest.mark.parametrize("messages, problem", [
    ([], "empty_conversation"),
    ([{"role": "assistant", "content": "hi"}], "does_not_start_with_user"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "roles_do_not_alternate"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "  "}], "empty_turn"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "system", "content": "c"}],
     "system_not_first"),
    ([{"role": "user", "content": "a"}], "does_not_end_with_assistant"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "tool", "content": "c"}],
     "tool_result_without_call"),
    ([{"role": "user", "content": "a"}, {"role": "narrator", "content": "b"}], "unknown_role"),
])
def test_bad_conversations_are_named_by_their_problem(messages, problem):
    assert conversation_problem(messages) == problem


def test_a_tool_call_conversation_is_valid():
    messages = [{"role": "user", "content": "weather?"},
                {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "w", "arguments": {}}}]},
                {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}]
    assert conversation_problem(messages) is None


def test_data_kit_conversations_and_function_calls_are_read_with_locations():
    report = SourceReport("fc")
    source = BranchSource(name="fc", kind="local", format="function_calling",
                          paths=[str(DATA / "function_calling" / "glaive_toolcall_sample.jsonl.gz")])
    rows = list(read_conversations(source, "fail", report))
    assert len(rows) == report.read == 300
    location, messages = rows[0]
    assert location.endswith("glaive_toolcall_sample.jsonl.gz:1")
    assert messages[0]["role"] == "system" and "<tools>" in messages[0]["content"]
    calls = [m for m in messages if m.get("tool_calls")]
    assert calls and all(isinstance(c["function"]["arguments"], str) for m in calls for c in m["tool_calls"])


def test_folded_tool_conversations_render_exactly_like_the_original(tiny_corpus):
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(tiny_corpus / "tokenizer"))
    with gzip.open(DATA / "function_calling" / "glaive_toolcall_sample.jsonl.gz", "rt") as handle:
        rows = [json.loads(next(handle)) for _ in range(20)]
    for row in rows:
        original = tokenizer.apply_chat_template(row["messages"], tools=row["tools"], tokenize=False)
        assert tokenizer.apply_chat_template(fold_tools(row["messages"], row["tools"]), tokenize=False) == original


def test_a_malformed_record_fails_with_its_file_and_line_or_is_counted(tmp_path):
    path = tmp_path / "chat.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
    path.write_text(good + "\n" + "{not json\n" + json.dumps({"text": "no messages"}) + "\n")
    source = BranchSource(name="chat", kind="local", paths=[str(path)])
    with pytest.raises(DataError, match=f"{path}:2: invalid JSON"):
        list(read_conversations(source, "fail", SourceReport("chat")))
    path.write_text(good + "\n" + json.dumps({"text": "no messages"}) + "\n")
    with pytest.raises(DataError, match=f"{path}:2: not a conversation"):
        list(read_conversations(source, "fail", SourceReport("chat")))
    report = SourceReport("chat")
    assert len(list(read_conversations(source, "skip", report))) == 1
    assert report.dropped == {"malformed_record": 1} and report.examples[0].startswith(f"{path}:2")


def test_a_hedged_rewrite_record_without_a_final_answer_fails_with_its_file_and_line_or_is_counted(tmp_path):
    from branch.data import _pair_from_record

    source = BranchSource(name="hedged", kind="local", format="hedged_rewrite", paths=[str(tmp_path / "x.jsonl")])
    answer = "Cats purr at 25 to 150 Hz, mostly while relaxed, and the vibration may even help their bones heal."
    good = {"messages": [{"role": "user", "content": "Why do cats purr?"}, {"role": "assistant", "content": answer}]}
    pair = _pair_from_record(good, source, "x.jsonl:1", "fail", SourceReport("hedged"))
    assert pair["chosen"][0]["content"] == answer and pair["rejected"][0]["content"] != answer
    assert score_reply(pair["rejected"][0]["content"]).hedging > 0
    ends_with_user = {"messages": good["messages"][:1]}
    with pytest.raises(DataError, match=r"x.jsonl:2: not a hedged_rewrite record \(missing or wrong last message \(an assistant.s text\)\)"):
        _pair_from_record(ends_with_user, source, "x.jsonl:2", "fail", SourceReport("hedged"))
    report = SourceReport("hedged")
    assert _pair_from_record(ends_with_user, source, "x.jsonl:2", "skip", report) is None
    assert report.dropped == {"malformed_record": 1} and report.examples == ["x.jsonl:2: malformed_record"]


@pytest.mark.parametrize("record", [
    {"prompt": [{"role": "user", "content": "Why do cats purr?"}],
     "chosen": [{"role": "assistant", "content": "To calm themselves."}],
     "rejected": [{"role": "assistant", "content": "No idea."}]},  # TRL's explicit prompt: as it is
    {"prompt": "Why do cats purr?", "chosen": "To calm themselves.", "rejected": "No idea."},  # TRL's standard
    {"prompt": "Why do cats purr?",  # HuggingFaceH4/ultrafeedback_binarized: whole conversations beside a string
     "chosen": [{"role": "user", "content": "Why do cats purr?"}, {"role": "assistant", "content": "To calm themselves."}],
     "rejected": [{"role": "user", "content": "Why do cats purr?"}, {"role": "assistant", "content": "No idea."}]},
])
def test_every_trl_preference_shape_becomes_an_explicit_prompt_and_one_reply_each(record):
    from branch.conversations import explicit_prompt_pair

    pair = explicit_prompt_pair(record["prompt"], record["chosen"], record["rejected"])
    assert pair == {"prompt": [{"role": "user", "content": "Why do cats purr?"}],
                    "chosen": [{"role": "assistant", "content": "To calm themselves."}],
                    "rejected": [{"role": "assistant", "content": "No idea."}]}


def test_an_implicit_prompt_keeps_every_shared_turn_of_a_multi_turn_conversation():
    from branch.conversations import explicit_prompt_pair, preference_problem

    turns = [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "7."},
             {"role": "user", "content": "A larger one?"}]
    pair = explicit_prompt_pair(None, turns + [{"role": "assistant", "content": "101, the 26th prime."}],
                                turns + [{"role": "assistant", "content": "Maybe 9."}])
    assert pair["prompt"] == turns and pair["chosen"] == [{"role": "assistant", "content": "101, the 26th prime."}]
    assert preference_problem(pair) is None
    with pytest.raises(KeyError):  # an explicit pair without its prompt is a malformed record
        explicit_prompt_pair(None, [{"role": "assistant", "content": "7."}], [{"role": "assistant", "content": "9."}])


def test_the_genesis_1b_recipe_reads_ultrafeedback_from_a_dataset_laid_out_like_the_hub(tiny_corpus, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import PreTrainedTokenizerFast

    from branch.data import assemble_data

    # The data kit's AlpacaEval pairs in HuggingFaceH4/ultrafeedback_binarized's columns and file layout.
    with gzip.open(DATA / "dpo" / "alpaca_eval_gpt4_judged.jsonl.gz", "rt") as f:
        kit = [json.loads(line) for _, line in zip(range(300), f)]
    rows = [{"prompt": r["prompt"][0]["content"], "prompt_id": str(i), "chosen": r["prompt"] + r["chosen"],
             "rejected": r["prompt"] + r["rejected"], "messages": r["prompt"] + r["chosen"], "score_chosen": 8.0,
             "score_rejected": 4.0} for i, r in enumerate(kit)]
    hub = tmp_path / "ultrafeedback_binarized"
    (hub / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), hub / "data" / "train_prefs-00000-of-00001.parquet")

    config = load_config(BranchConfig, REPO_ROOT / "configs" / "branch" / "genesis-1b.yaml", ["sft_sources=[]"])
    config.dpo_sources = [source.model_copy(update={"hub_id": str(hub)}) for source in config.dpo_sources]
    data = assemble_data(config, PreTrainedTokenizerFast.from_pretrained(str(tiny_corpus / "tokenizer")))
    judged, hedged = (data.report["dpo"][name] for name in ("ultrafeedback", "ultrafeedback-hedged"))
    assert judged["read"] == hedged["read"] == 300
    assert judged["kept"] > 250 and 50 < hedged["kept"] < judged["kept"]  # hedging or short answers make no rewrite
    rows_by_source = {}
    for row in data.dpo_train + data.dpo_heldout:
        rows_by_source.setdefault(row["source"], []).append(row)
    answers = {r["prompt"][0]["content"]: (r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in kit}
    for row in rows_by_source["ultrafeedback"]:
        assert [m["role"] for m in row["prompt"]] == ["system", "user"]
        assert (row["chosen"][0]["content"], row["rejected"][0]["content"]) == answers[row["prompt"][-1]["content"]]
    for row in rows_by_source["ultrafeedback-hedged"]:
        question = row["prompt"][-1]["content"]
        assert row["chosen"][0]["content"] == answers[question][0].strip()
        assert score_reply(row["rejected"][0]["content"], question).hedging > 0
    # One question, one side of the split, whichever source it came from.
    train_prompts = {row["prompt"][-1]["content"] for row in data.dpo_train}
    assert not train_prompts & {row["prompt"][-1]["content"] for row in data.dpo_heldout}


def test_branch_data_is_checked_split_and_reported(tiny_corpus, tmp_path):
    from transformers import PreTrainedTokenizerFast

    from branch.data import assemble_data

    rubric_file = tmp_path / "candidates.jsonl"
    rubric_file.write_text(json.dumps({"prompt": "Why do cats purr?", "responses": [
        "It depends on many factors. You may want to consult an expert.",
        "Cats purr at 25 to 150 Hz, for example while nursing kittens. Have you noticed cats purr when hurt too?"]}) + "\n"
        + json.dumps({"prompt": "Name a colour.", "responses": ["Red.", "Blue."]}) + "\n")
    config = load_config(BranchConfig, TINY_BRANCH, [
        "sft_sources=[{name: gsm8k, kind: local, paths: ['" + str(DATA / "sft" / "gsm8k.test.jsonl.gz") + "'], max_records: 200}]",
        "dpo_sources=[{name: hh, kind: local, format: preference, paths: ['" + str(DATA / "dpo" / "hh_rlhf_harmless_base.test.jsonl.gz")
        + "'], max_records: 300}, {name: rubric, kind: local, format: rubric, paths: ['" + str(rubric_file) + "']}, "
        "{name: hedged, kind: local, format: hedged_rewrite, paths: ['" + str(DATA / "sft" / "alpaca_seed_tasks.jsonl.gz")
        + "']}]"])
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(tiny_corpus / "tokenizer"))
    data = assemble_data(config, tokenizer)
    report = data.report
    assert report["sft"]["gsm8k"]["read"] == 200
    assert report["sft"]["gsm8k"]["dropped"].get("longer_than_max_length", 0) > 0  # 256-token context
    assert all(row["messages"][0]["content"] == report["system_prompt"] for row in data.sft if row["source"] == "gsm8k")
    assert report["dpo"]["rubric"]["kept"] == 1 and report["dpo"]["rubric"]["dropped"] == {"rubric_margin_too_small": 1}
    assert report["dpo"]["hh"]["heldout"] > 0 and report["dpo"]["builtin"]["heldout"] > 0
    # Good answers against hedged rewrites of them; short or hedging answers make no pair.
    hedged = report["dpo"]["hedged"]
    assert hedged["read"] == 175 and hedged["kept"] > 50 and hedged["heldout"] > 0
    assert hedged["dropped"]["answer_shorter_than_min_answer_chars"] > 0
    assert hedged["read"] == hedged["kept"] + sum(hedged["dropped"].values())
    for row in data.dpo_train + data.dpo_heldout:
        if row["source"] == "hedged":
            question, chosen, rejected = (row["prompt"][-1]["content"], row["chosen"][0]["content"],
                                          row["rejected"][0]["content"])
            assert score_reply(rejected, question).score < score_reply(chosen, question).score
            assert score_reply(rejected, question).hedging > 0 == score_reply(chosen, question).hedging
    train_prompts = {row["prompt"][-1]["content"] for row in data.dpo_train}
    assert not train_prompts & {row["prompt"][-1]["content"] for row in data.dpo_heldout}
    assert report["totals"]["dpo_train"] == len(data.dpo_train)


def test_a_good_answer_from_the_data_kit_gets_a_hedged_rewrite_that_keeps_its_first_sentence_and_hedges():
    from genesis.principles.dialogues import first_sentence, hedged_rewrite_of_answer

    with gzip.open(DATA / "sft" / "alpaca_eval_gpt4.jsonl.gz", "rt") as f:
        conversations = [json.loads(line)["messages"] for line in f][:200]
    rewrites = set()
    for user, assistant in conversations:
        question, answer = user["content"], assistant["content"]
        if score_reply(answer, question).hedging > 0 or NOT_BENIGN.search(question):
            continue  # (where a referral is the right answer, the pipeline makes no pair: tested below)
        rewrite = hedged_rewrite_of_answer(answer, question)
        assert rewrite == hedged_rewrite_of_answer(answer, question)  # the same prompt, the same rewrite
        assert score_reply(rewrite, question).hedging >= 1.5, rewrite
        assert score_reply(rewrite, question).score < score_reply(answer, question).score
        gist = first_sentence(answer)
        assert gist[1:].rstrip(".") in rewrite if gist else "this" in rewrite
        assert len(rewrite) < len(answer) + 300
        rewrites.add(rewrite.split(". ")[0])
    assert len(rewrites) >= len(HEDGE_OPENERS)  # the hedges vary from prompt to prompt
    assert first_sentence("```python\nprint(1)\n```") == ""
    assert first_sentence("1. **Sort** the list first. Then scan it.") == "Sort the list first."
    assert first_sentence("Here are some tips:\n- sleep") == first_sentence("def f(x):\n    return x") == ""


# ---------------------------------------------------------------------------------------------------------------
# A real branch off a real milestone, and bad input


def test_a_checkpoint_that_is_missing_or_incomplete_is_one_line(tmp_path):
    line = one_error_line(genesis("branch", "--milestone", str(tmp_path / "nope"), "--config", str(TINY_BRANCH),
                                  "--out", str(tmp_path / "b")))
    assert "does not exist" in line
    (tmp_path / "half").mkdir()
    line = one_error_line(genesis("branch", "--milestone", str(tmp_path / "half"), "--config", str(TINY_BRANCH),
                                  "--out", str(tmp_path / "b")))
    assert "incomplete" in line
    assert not (tmp_path / "b").exists()


def test_a_tokenizer_without_a_chat_template_is_refused(tiny_corpus, tmp_path):
    import shutil

    from branch.base import check_chat_template

    tokenizer = tmp_path / "tokenizer"
    shutil.copytree(tiny_corpus / "tokenizer", tokenizer)
    (tokenizer / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((tokenizer / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (tokenizer / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(DataError, match="no chat template"):
        check_chat_template(tokenizer, "milestone")
    check_chat_template(tiny_corpus / "tokenizer", "milestone")


@pytest.mark.slow
def test_a_branch_off_a_milestone_gives_sft_and_dpo_models_and_dpo_prefers_the_chosen_answers(tiny_trunk, tmp_path):
    import os

    from transformers import AutoModelForCausalLM, AutoTokenizer

    milestone = tiny_trunk / "milestones" / "step_00000150"
    out = tmp_path / "branch"
    args = ["branch", "--milestone", str(milestone), "--config", str(TINY_BRANCH), "--out", str(out),
            "sft.epochs=2", "eval.max_prompts=12", "eval.max_new_tokens=80"]
    # A crash just before evaluation keeps the finished SFT and DPO models and writes no eval.json...
    env = {**os.environ, "GENESIS_BRANCH_FAIL_STAGE": "eval"}
    crashed = subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, text=True,
                             timeout=900, cwd=REPO_ROOT, env=env)
    assert crashed.returncode != 0 and "injected failure" in crashed.stderr
    assert (out / "sft" / "genesis_stage.json").is_file() and (out / "dpo" / "genesis_stage.json").is_file()
    assert not (out / "eval.json").exists()
    # ...and the rerun picks up there instead of training again.
    finished = genesis(*args)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "SFT already complete" in finished.stdout and "DPO already complete" in finished.stdout

    result = json.loads((out / "eval.json").read_text())
    for stage in ("sft", "dpo"):
        assert set(result[stage]) >= {"preference_accuracy", "preference_accuracy_length_normalized",
                                      "format_adherence", "hedging_score"}
        model_dir = out / stage
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        assert "{% generation %}" in tokenizer.chat_template or "{%- generation %}" in tokenizer.chat_template
        model = AutoModelForCausalLM.from_pretrained(str(model_dir))
        assert tokenizer.convert_tokens_to_ids("<|im_end|>") in model.generation_config.eos_token_id
    assert result["dpo"]["preference_accuracy"] > result["sft"]["preference_accuracy"]
    assert result["dpo"]["reward_accuracy_vs_sft"] > 0.5  # DPO itself moved most held-out pairs toward chosen
    assert result["samples"] and {"prompt", "sft", "dpo"} <= set(result["samples"][0])
    report = json.loads((out / "data" / "report.json").read_text())
    assert report["totals"]["dpo_heldout"] == result["heldout_pairs"]
    lineage = json.loads((out / "branch.json").read_text())
    assert lineage["step"] == 150 and lineage["milestone"] == str(milestone)
    # SFT grew from the milestone's one export, which the evaluation also scored against.
    assert lineage["base"] == str((tiny_trunk / "hf" / "step_00000150").resolve()) and not (out / "base").exists()
    assert json.loads((out / "sft" / "genesis_stage.json").read_text())["parent"] == lineage["base"]

    # Several replies per prompt: replica r is the reply that a one-reply evaluation seeded `seed + r` samples.
    from branch.config import EvalRecipe
    from branch.evaluate import sample_replies

    tokenizer = AutoTokenizer.from_pretrained(str(out / "sft"))
    prompts = [json.loads(line) for line in (out / "data" / "heldout_prompts.jsonl").read_text().splitlines()][:5]
    recipe = EvalRecipe(max_new_tokens=30, batch_size=3, replies_per_prompt=2, seed=7)
    both = sample_replies(out / "sft", tokenizer, prompts, recipe, "cpu")
    second_alone = sample_replies(out / "sft", tokenizer, prompts,
                                  recipe.model_copy(update={"replies_per_prompt": 1, "seed": 8}), "cpu")
    assert [own[1] for own in both] == [own[0] for own in second_alone]
    assert [own[0] for own in both] != [own[1] for own in both]


def test_the_reference_branch_config_validates_whole_and_reads_glaive_in_its_hub_layout(tmp_path):
    """configs/branch/genesis-1b.yaml names Glaive as `format: glaive` (columns `system` and `chat`, as on the hub):
    the branch stage accepts it and reads such a file as tool conversations."""
    from tests.test_sources import GLAIVE_ROWS

    config = load_config(BranchConfig, REPO_ROOT / "configs" / "branch" / "genesis-1b.yaml")
    assert any(source.format == "glaive" for source in config.sft_sources)
    path = tmp_path / "glaive.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in GLAIVE_ROWS))
    report = SourceReport("glaive")
    conversations = list(read_conversations(BranchSource(name="glaive", kind="local", format="glaive", paths=[str(path)]),
                                            "skip", report))
    assert len(conversations) == 2  # the third row's call arguments are not JSON: malformed, counted
    assert any("<tool_call>" in message["content"] for _, messages in conversations for message in messages)
