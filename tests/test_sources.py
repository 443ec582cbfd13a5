"""Reading sources (issue #24): the read units the partitioned stage runs in parallel (one local file, one hub
stream shard), defect 4 (empty files, JSON arrays, offline and unreachable hub ids, save_to_disk folders), the
text near-dedup compares (defect 5), Glaive's real layout, and the reference corpus config."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from data_prep.dedup import MinHasher, deduplicate, jaccard_of_sorted
from data_prep.sources import (CorpusConfig, SourceConfig, hub_num_shards, iter_file_records, iter_hub_records,
                               iter_local_records, iter_texts, record_to_dedup_text, record_to_text)
from genesis.chat import render_chat_for_pretraining
from genesis.config import REPO_ROOT, load_config
from genesis.errors import DataError
from tests.conftest import SHARED, readable

DATA = SHARED / "data"
CORPUS_60B = REPO_ROOT / "configs" / "corpus" / "genesis-60b.yaml"
BRANCH_1B = REPO_ROOT / "configs" / "branch" / "genesis-1b.yaml"


def local(name, paths, **fields) -> SourceConfig:
    return SourceConfig(name=name, kind="local", paths=[str(p) for p in paths], **({"weight": 1.0} | fields))


def hub(hub_id, **fields) -> SourceConfig:
    return SourceConfig(name=fields.pop("name", "h"), kind="hub", hub_id=str(hub_id), **({"weight": 1.0} | fields))


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message and "Traceback" not in message, message
    return message


def read_jsonl_gz(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


# ---------------------------------------------------------------------------------------------------------------
# Read units: one local file


def test_iter_file_records_reads_each_supported_file_type_and_iter_local_records_is_their_concatenation(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "jsonl one"}\n\n{"text": "jsonl two"}\n')
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as handle:
        handle.write('{"text": "gz one"}\n')
    pq.write_table(pa.table({"text": ["parquet one", "parquet two"]}), tmp_path / "c.parquet")
    (tmp_path / "d.txt").write_text("text one\ntext two\n")
    (tmp_path / "e.json").write_text(json.dumps([{"text": "array one"}, {"text": "array two"}], indent=2))
    files = [tmp_path / name for name in ("a.jsonl", "b.jsonl.gz", "c.parquet", "d.txt", "e.json")]
    source = local("all", files)
    per_file = []
    for path in files:
        counts: dict = {}
        per_file += [record["text"] for record in iter_file_records(path, source, "skip", counts)]
        assert counts == {}
    assert per_file == ["jsonl one", "jsonl two", "gz one", "parquet one", "parquet two", "text one", "text two",
                        "array one", "array two"]
    assert [record["text"] for record in iter_local_records(source, "skip", {})] == per_file


def test_function_calling_records_are_read_exactly_as_stored():
    """Arrow's schema inference (the old `datasets` JSON path) turned BFCL's 8.854e-12 into 0.0 in 31 records."""
    path = DATA / "function_calling" / "bfcl_v4.jsonl.gz"
    source = local("fc", [path], format="function_calling")
    rows = read_jsonl_gz(path)
    texts = list(iter_texts(source))
    assert texts == [render_chat_for_pretraining(row["messages"], row.get("tools")) for row in rows]


# ---------------------------------------------------------------------------------------------------------------
# Defect 4: empty files, JSON arrays


@pytest.mark.parametrize("name", ["empty.jsonl", "empty.jsonl.gz", "empty.json", "empty.parquet", "empty.txt"])
def test_a_zero_byte_file_beside_others_is_skipped_and_counted(tmp_path, name):
    (tmp_path / name).write_bytes(b"")
    (tmp_path / "good.jsonl").write_text('{"text": "a document"}\n')
    counts: dict = {}
    source = local("s", [tmp_path / name, tmp_path / "good.jsonl"])
    assert list(iter_texts(source, counts=counts)) == ["a document"]
    assert counts == {"empty_file": 1}
    counts = {}
    assert list(iter_file_records(tmp_path / name, source, "fail", counts)) == [] and counts == {"empty_file": 1}


def test_a_source_whose_files_are_all_empty_fails_in_one_line_naming_them(tmp_path):
    for name in ("a.jsonl", "b.parquet"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(DataError) as err:
        list(iter_texts(local("hollow", [tmp_path / "a.jsonl", tmp_path / "b.parquet"])))
    message = one_line(err)
    assert "'hollow'" in message and "empty" in message and "a.jsonl" in message


@pytest.mark.parametrize("name", ["records.json", "records.json.gz"])
def test_a_json_array_file_is_read_as_records(tmp_path, name):
    text = json.dumps([{"text": "first record"}, {"text": "second\nrecord"}, {"body": "no text"}], indent=2)
    path = tmp_path / name
    if name.endswith(".gz"):
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    counts: dict = {}
    assert list(iter_texts(local("arr", [path]), counts=counts)) == ["first record", "second\nrecord"]
    assert counts == {"malformed_record": 1}


def test_a_json_file_that_is_neither_records_nor_lines_fails_in_one_line(tmp_path):
    nested = tmp_path / "squad.json"
    nested.write_text(json.dumps({"version": "1.1", "data": [{"title": "t", "paragraphs": []}]}, indent=2))
    with pytest.raises(DataError) as err:
        list(iter_texts(local("n", [nested])))
    assert str(nested) in one_line(err)
    truncated = tmp_path / "cut.json"
    truncated.write_text('[\n  {"text": "one"},\n  {"text": "tw')
    with pytest.raises(DataError) as err:
        list(iter_texts(local("c", [truncated])))
    assert f"{truncated}:3" in one_line(err)


# ---------------------------------------------------------------------------------------------------------------
# Defect 4: hub sources


def test_an_offline_hub_id_fails_in_one_line_naming_source_hub_id_and_the_way_out(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = hub("HuggingFaceFW/fineweb-edu", name="fineweb_edu", subset="sample-100BT")
    for attempt in (lambda: hub_num_shards(source), lambda: list(iter_hub_records(source)),
                    lambda: list(iter_texts(source))):
        with pytest.raises(DataError) as err:
            attempt()
        message = one_line(err)
        assert "'fineweb_edu'" in message and "HuggingFaceFW/fineweb-edu" in message and "HF_HUB_OFFLINE" in message


def test_an_unreachable_or_unknown_hub_id_fails_in_one_line(monkeypatch):
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)

    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'org/set' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(DataError) as err:
        hub_num_shards(hub("org/set", name="web"))
    message = one_line(err)
    assert "'web'" in message and "org/set" in message and "network" in message

    def missing(*args, **kwargs):
        raise DatasetNotFoundError("Dataset 'org/set' doesn't exist on the Hub or cannot be accessed.")

    monkeypatch.setattr(datasets, "load_dataset", missing)
    with pytest.raises(DataError) as err:
        list(iter_hub_records(hub("org/set", name="web")))
    message = one_line(err)
    assert "org/set" in message and "login" in message


def test_a_save_to_disk_folder_given_as_hub_id_is_loaded_from_disk(tmp_path):
    import datasets

    rows = {"text": [f"saved document {i}" for i in range(10)]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "one"), num_shards=2)
    source = hub(tmp_path / "one")
    assert list(iter_texts(source)) == rows["text"]
    assert hub_num_shards(source) == 2
    shards = [[r["text"] for r in iter_hub_records(source, index, 2)] for index in range(2)]
    assert all(shards) and sum(shards, []) == rows["text"]
    split = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a train row"]}),
                                  "test": datasets.Dataset.from_dict({"text": ["a test row"]})})
    split.save_to_disk(str(tmp_path / "dict"))
    assert list(iter_texts(hub(tmp_path / "dict", split="test"))) == ["a test row"]
    with pytest.raises(DataError) as err:
        list(iter_texts(hub(tmp_path / "dict", split="validation")))
    assert "validation" in one_line(err) and "train" in str(err.value)


def test_a_hub_dataset_is_read_shard_by_shard(tmp_path):
    """A folder laid out like a hub dataset repo (data/train-0000i-of-00004.parquet) streams as 4 shards."""
    (tmp_path / "data").mkdir()
    expected = []
    for index in range(4):
        texts = [f"shard {index} document {i}" for i in range(5)]
        expected += texts
        pq.write_table(pa.table({"text": texts}), tmp_path / "data" / f"train-{index:05d}-of-00004.parquet")
    source = hub(tmp_path)
    assert hub_num_shards(source) == 4
    assert [r["text"] for r in iter_hub_records(source)] == expected
    for count in (1, 2, 4):
        shards = [[r["text"] for r in iter_hub_records(source, index, count)] for index in range(count)]
        assert sum(shards, []) == expected and all(shards)
    with pytest.raises(DataError) as err:
        list(iter_hub_records(source, 4, 4))
    one_line(err)


# ---------------------------------------------------------------------------------------------------------------
# Defect 5: the text near-dedup compares


def user_question(record: dict) -> str:
    """The first user turn's words: the question the record asks."""
    question = next(m["content"] for m in record["messages"] if m["role"] == "user")
    return " ".join(re.findall(r"\w+", question.lower()))


def same_question(first: str, second: str) -> bool:
    """Equal, or one wrapping the other ("<<question>> What's ..." and "What's ...")."""
    return first in second or second in first


def test_function_calling_records_that_ask_different_questions_are_not_near_duplicates_on_their_dedup_text():
    rows = []
    for name in ("bfcl_v4", "glaive_toolcall_sample"):
        rows += read_jsonl_gz(DATA / "function_calling" / f"{name}.jsonl.gz")
    source = SourceConfig(name="fc", kind="local", paths=["unused"], format="function_calling", weight=1.0)
    rendered = [record_to_text(row, source) for row in rows]
    dedup_texts = [record_to_dedup_text(row, source) for row in rows]
    for row, text in zip(rows, dedup_texts):  # no tool schema, no template boilerplate; every turn's content
        assert "<|im_start|>" not in text and "You can call these tools" not in text
        for message in row["messages"]:
            if message["role"] != "system" and message.get("content"):
                assert message["content"] in text
            for call in message.get("tool_calls") or []:
                assert json.dumps(call["function"]["arguments"], ensure_ascii=False) in text
    questions = [user_question(row) for row in rows]
    # The rendered text is what made near-dedup remove ~900 of the 2,801 (the 893), nearly all of them
    # asking another question than the record they were taken for.
    _, on_rendered = deduplicate(rendered, exact=False)
    assert on_rendered["near_duplicates"] > 800
    assert sum(not same_question(questions[removed], questions[kept])
               for removed, (kept, _) in on_rendered["removed_by"].items()) > 800
    # On the dedup text, what near-dedup removes asks the same question as what it keeps (BFCL repeats questions
    # across categories, with other tool lists and the same answer).
    _, on_dedup_text = deduplicate(dedup_texts, exact=False)
    assert on_dedup_text["near_duplicates"] < on_rendered["near_duplicates"] / 4
    for removed, (kept, _) in on_dedup_text["removed_by"].items():
        assert same_question(questions[removed], questions[kept]), (dedup_texts[removed][:300], dedup_texts[kept][:300])

    # Every pair at or above near-dedup's exact-Jaccard threshold asks the same question (all pairs, through an
    # inverted index of shingles, verified exactly).
    hasher = MinHasher()
    shingles = [hasher.shingles(text) for text in dedup_texts]
    holders: dict[int, list[int]] = {}
    for index, shingle_set in enumerate(shingles):
        for shingle in shingle_set.tolist():
            holders.setdefault(shingle, []).append(index)
    shared: dict[tuple[int, int], int] = {}
    for members in holders.values():
        for position, first in enumerate(members):
            for second in members[position + 1:]:
                shared[first, second] = shared.get((first, second), 0) + 1
    checked = 0
    for (first, second), count in shared.items():
        if count / (len(shingles[first]) + len(shingles[second]) - count) >= 0.6:
            checked += 1
            if jaccard_of_sorted(shingles[first], shingles[second]) >= 0.65:
                assert same_question(questions[first], questions[second]), (dedup_texts[first][:300],
                                                                            dedup_texts[second][:300])
    assert checked > 0


def test_the_dedup_text_of_a_text_record_is_its_text_and_of_xlam_its_query_and_calls():
    assert record_to_dedup_text({"text": "plain words"}, local("t", ["x"])) == "plain words"
    xlam = {"query": "Weather in Oslo?", "answers": json.dumps([{"name": "weather", "arguments": {"city": "Oslo"}}]),
            "tools": json.dumps([{"name": "weather", "description": "forecast", "parameters": {}}])}
    text = record_to_dedup_text(xlam, local("x", ["x"], format="xlam"))
    assert "Weather in Oslo?" in text and '{"city": "Oslo"}' in text and "forecast" not in text
    with pytest.raises(KeyError):
        record_to_dedup_text({"body": "no text"}, local("t", ["x"]))


# ---------------------------------------------------------------------------------------------------------------
# Glaive, laid out exactly like glaiveai/glaive-function-calling-v2 (columns `system` and `chat`)

GLAIVE_TOOLS = [
    {"name": "get_news_headlines", "description": "Get the latest news headlines",
     "parameters": {"type": "object", "properties": {"country": {"type": "string",
                                                                  "description": "The country for which to fetch news"}},
                    "required": ["country"]}},
    {"name": "get_random_quote", "description": "Get a random quote", "parameters": {}},
]
GLAIVE_ROWS = [
    {"system": "SYSTEM: You are a helpful assistant with access to the following functions. Use them if required -\n"
               + "\n\n".join(json.dumps(tool, indent=4) for tool in GLAIVE_TOOLS) + "\n",
     "chat": "USER: Can you tell me the latest news headlines for the United States?\n\n\n"
             "ASSISTANT: <functioncall> {\"name\": \"get_news_headlines\", \"arguments\": '{\"country\": \"United States\"}'}"
             " <|endoftext|>\n\n\n"
             "FUNCTION RESPONSE: {\"headlines\": [\"Apple unveils new iPhone\"]}\n\n\n"
             "ASSISTANT: Here are the latest headlines: Apple unveils new iPhone. <|endoftext|>\n\n\n"
             "USER: And a quote, please. I'm bored.\n\n\n"
             "ASSISTANT: Sure, let me find one. <|endoftext|>\n\n\n"
             "ASSISTANT: <functioncall> {\"name\": \"get_random_quote\", \"arguments\": {}} <|endoftext|>\n\n\n"
             "FUNCTION RESPONSE: {\"quote\": \"Stay hungry.\"}\n\n\n"
             "ASSISTANT: \"Stay hungry.\" <|endoftext|>\n\n\n"},
    {"system": "SYSTEM: You are a helpful assistant, with no access to external functions.\n\n",
     "chat": "USER: Hi!\n\n\nASSISTANT: Hello! How can I help? <|endoftext|>\n\n\nUSER: Thanks.\n\n\n"},
    {"system": "SYSTEM: You are a helpful assistant with access to the following functions. Use them if required -\n"
               + json.dumps(GLAIVE_TOOLS[1], indent=4) + "\n",
     "chat": "USER: Quote?\n\n\nASSISTANT: <functioncall> {\"name\": \"get_random_quote\", \"arguments\": '{\"broken'} "
             "<|endoftext|>\n\n\n"},
]
GLAIVE_CONVERSATIONS = [
    ([{"role": "user", "content": "Can you tell me the latest news headlines for the United States?"},
      {"role": "assistant", "content": "", "tool_calls": [
          {"type": "function", "function": {"name": "get_news_headlines", "arguments": {"country": "United States"}}}]},
      {"role": "tool", "name": "get_news_headlines", "content": "{\"headlines\": [\"Apple unveils new iPhone\"]}"},
      {"role": "assistant", "content": "Here are the latest headlines: Apple unveils new iPhone."},
      {"role": "user", "content": "And a quote, please. I'm bored."},
      {"role": "assistant", "content": "Sure, let me find one.", "tool_calls": [
          {"type": "function", "function": {"name": "get_random_quote", "arguments": {}}}]},
      {"role": "tool", "name": "get_random_quote", "content": "{\"quote\": \"Stay hungry.\"}"},
      {"role": "assistant", "content": "\"Stay hungry.\""}],
     [{"type": "function", "function": tool} for tool in GLAIVE_TOOLS]),
    ([{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help?"}], None),
]


def test_glaive_records_render_as_tool_conversations(tmp_path):
    from genesis.records import glaive_to_conversation

    path = tmp_path / "glaive-function-calling-v2.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in GLAIVE_ROWS))
    for row, expected in zip(GLAIVE_ROWS, GLAIVE_CONVERSATIONS):
        assert glaive_to_conversation(row) == expected
    counts: dict = {}
    texts = list(iter_texts(local("glaive", [path], format="glaive"), counts=counts))
    assert texts == [render_chat_for_pretraining(*conversation) for conversation in GLAIVE_CONVERSATIONS]
    texts = [readable(text) for text in texts]
    assert counts == {"malformed_record": 1}  # the call whose arguments are not JSON
    for text in texts:
        for raw in ("<|endoftext|>", "USER:", "ASSISTANT:", "FUNCTION RESPONSE", "<functioncall>", "SYSTEM:"):
            assert raw not in text
    assert '<tool_call>{"name": "get_news_headlines", "arguments": {"country": "United States"}}</tool_call>' in texts[0]
    assert "<tool_response>{\"quote\": \"Stay hungry.\"}</tool_response>" in texts[0]
    dedup = record_to_dedup_text(GLAIVE_ROWS[0], local("glaive", [path], format="glaive"))
    assert "Get the latest news headlines" not in dedup and "United States" in dedup


def test_both_reference_configs_read_glaive_in_its_real_layout():
    corpus = yaml.safe_load(CORPUS_60B.read_text())["sources"]
    branch = yaml.safe_load(BRANCH_1B.read_text())["sft_sources"]
    glaive = [s for s in corpus + branch if s.get("hub_id") == "glaiveai/glaive-function-calling-v2"]
    assert len(glaive) == 2
    for source in glaive:
        assert source["format"] == "glaive" and "messages_field" not in source and "text_field" not in source


# ---------------------------------------------------------------------------------------------------------------
# The reference corpus config


def test_genesis_60b_loads_unchanged_and_its_first_hub_source_fails_offline_in_one_line(monkeypatch):
    config = load_config(CorpusConfig, CORPUS_60B)
    first = next(source for source in config.sources if source.kind == "hub")
    assert first.hub_id == "HuggingFaceFW/fineweb-edu"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for attempt in (lambda: hub_num_shards(first), lambda: next(iter_hub_records(first, 0, 1))):
        with pytest.raises(DataError) as err:
            attempt()
        assert "HuggingFaceFW/fineweb-edu" in one_line(err)


def test_genesis_60b_reads_wikipedia_in_every_culturax_language_and_dclm_in_several_slices():
    config = load_config(CorpusConfig, CORPUS_60B)
    culturax = {s.subset for s in config.sources if s.hub_id == "uonlp/CulturaX"}
    wikipedia = {s.subset for s in config.sources if s.hub_id == "wikimedia/wikipedia"}
    assert culturax == {"ar", "de", "es", "fr", "ja", "ko", "pt", "zh"}
    assert wikipedia == {f"20231101.{lang}" for lang in culturax | {"en"}}
    dclm = [s for s in config.sources if s.hub_id == "mlfoundations/dclm-baseline-1.0"]
    assert len(dclm) >= 2 and len({s.data_dir for s in dclm}) == len(dclm) and all(s.data_dir for s in dclm)
    assert len({s.name for s in config.sources}) == len(config.sources)
    total_tokens = sum(s.token_budget or 0 for s in config.sources)
    assert 55e9 <= total_tokens <= 65e9  # "~60B tokens"
    weights = {s.name: s.weight for s in config.sources}
    assert 0.95 <= sum(weights.values()) <= 1.05
    # English stays the largest Wikipedia, and each language's Wikipedia is smaller than its CulturaX slice.
    by_subset = {(s.hub_id, s.subset): s for s in config.sources}
    english = by_subset["wikimedia/wikipedia", "20231101.en"]
    for lang in culturax:
        wiki = by_subset["wikimedia/wikipedia", f"20231101.{lang}"]
        assert wiki.weight < by_subset["uonlp/CulturaX", lang].weight and wiki.token_budget < english.token_budget
