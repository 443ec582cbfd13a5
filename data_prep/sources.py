"""The source registry (configs/corpus/*.yaml) and reading records.

A source is a hub dataset (streamed through `datasets`), local files (JSON Lines plain or .gz, JSON arrays,
Parquet, text), or the built-in corpus. Every record becomes one text: plain text from `text_field`, or a
conversation / function-calling record rendered with the project's chat template (so dialogues can join
pretraining, as in the reference run). Near-dedup compares another text of the record (`record_to_dedup_text`):
a conversation's turns without the tool schemas and template boilerplate that every record of a set shares.

Read units, which the partitioned stage runs in parallel:

    iter_file_records(path, source, on_bad, counts)        one local file
    iter_hub_records(source, shard_index, num_shards)      one of hub_num_shards(source) stream shards

A 0-byte file (or one with nothing but whitespace) is skipped and counted as `empty_file`; a local source whose
every file is empty is a one-line DataError (`source_files`). A hub id that cannot be opened (offline, unreachable,
unknown, gated, bad subset or split) is a one-line DataError naming the source and the hub id; a folder written
by `datasets`' save_to_disk given as hub_id is loaded with load_from_disk.
"""

from __future__ import annotations

import gzip
import json
import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from pydantic import Field

from genesis.chat import record_to_conversation, render_chat_for_pretraining, strip_marker_sentinels
from genesis.config import StrictModel
from genesis.errors import DataError
from genesis.records import (builder_for, first_json_char, glaive_to_conversation, open_text, read_json_document,
                             resolve_paths, scan_jsonl_numbered)


class SourceConfig(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    kind: Literal["hub", "local", "builtin"]
    hub_id: str | None = None
    subset: str | None = None
    data_dir: str | None = Field(default=None, description="hub sources: read only this folder of the dataset "
                                                           "repository (a slice, e.g. one global shard of DCLM)")
    split: str = "train"
    streaming: bool = True
    paths: list[str] = Field(default_factory=list, description="local files or globs, relative to the repo root")
    format: Literal["text", "chat", "function_calling", "sharegpt", "xlam", "glaive"] = "text"
    text_field: str = "text"
    messages_field: str = "messages"
    weight: float = Field(gt=0)
    token_budget: int | None = Field(default=None, gt=0, description="stop reading after ≈ this many tokens")
    max_docs: int | None = Field(default=None, gt=0)
    license: str = "unknown"


class CleanConfig(StrictModel):
    min_chars: int = Field(default=32, ge=0)
    max_chars: int = Field(default=500_000, gt=0)
    max_duplicate_line_fraction: float = Field(default=0.5, gt=0, le=1)
    max_control_char_fraction: float = Field(default=0.01, ge=0, le=1)
    exact_dedup: bool = True
    near_dedup: bool = True
    shingle_words: int = Field(default=5, ge=1)
    num_perm: int = Field(default=112, ge=8)
    bands: int = Field(default=14, ge=1)
    rows: int = Field(default=8, ge=1)
    near_min_jaccard: float = Field(default=0.65, gt=0, le=1,
                                    description="link an LSH candidate pair only at this exact shingle Jaccard")
    offset_bands: bool = Field(default=True, description="also probe the bands shifted by half a band")


class TokenizerTrainConfig(StrictModel):
    vocab_size: int = Field(default=49_152, gt=256, le=65_536, description="at most 65,536: shards store uint16 ids")
    sample_sentences: int = Field(default=200_000, gt=0)
    existing: str | None = Field(default=None, description="reuse this tokenizer (its dir, its tokenizer.model, or a "
                                                           "data dir holding tokenizer/) instead of training one")
    retrain: bool = Field(default=False, description="train a new tokenizer even though the data dir holds one "
                                                     "(a trunk trained on the old one then refuses the new shards)")
    threads: int = Field(default=8, ge=1, description="SentencePiece training threads; fixed, not the worker count, "
                                                     "because its BPE breaks ties differently with another count")


class CorpusConfig(StrictModel):
    name: str
    sources: list[SourceConfig] = Field(min_length=1)
    clean: CleanConfig = CleanConfig()
    tokenizer: TokenizerTrainConfig = TokenizerTrainConfig()
    docs_per_shard: int = Field(default=20_000, gt=0, description="documents per clean part and token shard: "
                                                                  "a job's memory is about one part")
    workers: int = Field(default=1, ge=1, description="Dask workers of the LocalCluster (one process each)")
    executor: Literal["dask", "serial"] = Field(
        default="dask", description="dask: a LocalCluster of `workers` processes, or the cluster at dask_address; "
                                    "serial: every job in this process, in order")
    dask_address: str | None = Field(default=None, description="an existing Dask scheduler, e.g. tcp://host:8786 "
                                                               "(its workers must see the data directory)")
    on_bad_record: Literal["skip", "fail"] = "skip"
    seed: int = 0
    hub_read_units: int = Field(default=16, ge=1, description="a hub source is read as up to this many stream "
                                                              "shards in parallel, each with its share of the budget")
    budget_read_margin: float = Field(default=1.25, ge=1.0, description="read this much more text than a "
                                      "token_budget estimates (4 bytes a token), so the budget is met after dedup")
    dedup_shuffle_rows: int = Field(default=4_000_000, ge=1, description="band keys one dedup bucket job holds: "
                                    "the hash range count is total documents / this")
    dedup_verify_pairs: int = Field(default=500, ge=1, description="candidate pairs per verification job: a job "
                                    "holds the shingle sets of both documents of each of its pairs and the clean "
                                    "parts' pages it reads them from, so this bounds a worker's memory (1,000 pairs "
                                    "held 5-20 MB of shingle sets and raised a worker's peak 11-13 MB above every "
                                    "other phase's on the 1 and 3 GB scale corpora: the stage's largest job)")
    planned_tokens: int | None = Field(default=None, gt=0, description="tokens the trunk will draw from this "
                                       "data (steps × batch tokens): report.json says how often each source repeats")


# -------------------------------------------------------------------------------------------------------------
# Rendering


def record_to_conversation_of(record: dict, source: SourceConfig) -> tuple[list[dict], list | None]:
    """A conversation-shaped record of `source` as (messages, tools); KeyError/TypeError/ValueError mean it is
    malformed."""
    if source.format == "glaive":
        return glaive_to_conversation(record)
    return record_to_conversation(record, source.format, source.messages_field)


def record_to_text(record: dict, source: SourceConfig) -> str:
    """One record as pretraining text; KeyError/TypeError/ValueError mean a malformed record. A conversation's
    template markers are written as sentinels (`genesis.chat.render_chat_for_pretraining`) that tokenization
    turns into marker ids; a document's own characters never can (sentinel code points are stripped from it)."""
    if source.format == "text":
        text = record[source.text_field]
        if not isinstance(text, str):
            raise TypeError(f"field '{source.text_field}' is {type(text).__name__}, not text")
        return strip_marker_sentinels(text)
    return render_chat_for_pretraining(*record_to_conversation_of(record, source))


def _arguments_text(arguments) -> str:
    return arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)


def record_to_dedup_text(record: dict, source: SourceConfig) -> str:
    """The part of a record that varies from record to record, which near-dedup compares: a text record's text;
    a conversation's user, assistant and tool turns (tool calls as name and arguments), one a line, without the
    system turn, the tool schemas and the template's markers. (Every record of a function-calling set repeats
    the same schemas and header: compared on the rendered text, records asking different questions looked like
    near-duplicates.) KeyError/TypeError/ValueError mean a malformed record, as in `record_to_text`."""
    if source.format == "text":
        return record_to_text(record, source)
    messages, _ = record_to_conversation_of(record, source)
    parts = []
    for message in messages:
        if message["role"] == "system":
            continue
        content = message.get("content")
        if content:
            if not isinstance(content, str):
                raise TypeError(f"a {message['role']} turn's content is {type(content).__name__}, not text")
            parts.append(content)
        for call in message.get("tool_calls") or []:
            function = call.get("function", call)
            parts.append(f"{function['name']} {_arguments_text(function['arguments'])}")
    return "\n".join(parts)


# -------------------------------------------------------------------------------------------------------------
# Reading local files

_PARQUET_BATCH_ROWS = 1024


def _count(counts: dict, reason: str) -> None:
    counts[reason] = counts.get(reason, 0) + 1


def source_files(source: SourceConfig) -> list[Path]:
    """A local source's files, in order (see `resolve_paths`); a source whose every file is 0 bytes has nothing
    to read, which is one line naming them (a lone empty file among others is skipped and counted instead)."""
    files = resolve_paths(source.paths, source.name)
    if files and all(path.stat().st_size == 0 for path in files):
        names = ", ".join(str(path) for path in files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
        raise DataError(f"source '{source.name}': every file is empty (0 bytes: {names}); fix the paths or "
                        f"regenerate the files")
    return files


def _json_lines(path: Path, on_bad: str, counts: dict) -> Iterator[dict]:
    """JSON Lines, one line at a time; a file in which no line is JSON at all fails in one line (it is not JSON
    Lines, whatever `on_bad` says about single bad records)."""
    invalid_before = counts.get("invalid_json", 0)
    produced = False
    for _, record in scan_jsonl_numbered(path, on_bad, counts):
        produced = True
        yield record
    invalid = counts.get("invalid_json", 0) - invalid_before
    if invalid and not produced:
        raise DataError(f"{path}: none of its {invalid} lines is JSON; a .jsonl/.json source holds one JSON record a "
                        f"line, or one JSON array of records")


def _json_file(path: Path, on_bad: str, counts: dict) -> Iterator[dict]:
    """A .json file: one JSON array of records (parsed whole), or JSON Lines (read a line at a time). A .jsonl
    file is always JSON Lines (never parsed whole, however big)."""
    if path.name.removesuffix(".gz").endswith(".jsonl"):
        yield from _json_lines(path, on_bad, counts)
        return
    first = first_json_char(path)
    if first == "[":
        document = read_json_document(path)
        if not isinstance(document, list):  # "[..." that parsed as something else cannot happen; be explicit
            raise DataError(f"{path}: not a JSON array of records")
        if not document:
            _count(counts, "empty_file")
        yield from document
        return
    if first == "{":
        with open_text(path) as handle:
            first_line = handle.readline()
        try:
            json.loads(first_line)
        except json.JSONDecodeError:
            # One object spanning lines (pretty-printed): a document, not records.
            document = read_json_document(path)
            if isinstance(document, dict):
                keys = ", ".join(list(document)[:5])
                raise DataError(f"{path}: one JSON object (keys {keys}) spanning lines, not records; write its "
                                f"records as a JSON array or as JSON Lines") from None
    yield from _json_lines(path, on_bad, counts)


def _text_lines(path: Path) -> Iterator[dict]:
    try:
        with open_text(path) as handle:
            for line in handle:
                yield {"text": line.rstrip("\n")}
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 (byte {err.start}); re-encode the file as UTF-8") from None


def _parquet_rows(path: Path) -> Iterator[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS):
            yield from batch.to_pylist()
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path}: unreadable Parquet ({str(err).splitlines()[0][:200]}); check the file") from None


def _has_content(path: Path, builder: str) -> bool:
    """Whether a JSON or text file holds anything but whitespace (a gzip of nothing is a few bytes)."""
    if builder == "parquet":
        return True
    if builder == "json":
        return first_json_char(path) != ""
    try:
        with open_text(path) as handle:
            while chunk := handle.read(4096):
                if chunk.strip():
                    return True
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 (byte {err.start}); re-encode the file as UTF-8") from None
    return False


def iter_file_records(path: Path, source: SourceConfig, on_bad: str, counts: dict) -> Iterator[dict]:
    """The records of one local file of `source`, in order: JSON Lines (plain or .gz; a bad line fails naming
    file:line, or with on_bad "skip" is skipped and counted as `invalid_json`), a .json array of records, Parquet,
    or text (one record {"text": line} a line). A file with nothing in it is skipped and counted as `empty_file`.
    JSON is read by a line reader, not `datasets`: Arrow's schema inference changed values (BFCL's 8.854e-12
    became 0.0) and a 0-byte file crashed it."""
    path = Path(path)
    builder = builder_for(path)
    try:
        if path.stat().st_size == 0 or not _has_content(path, builder):
            _count(counts, "empty_file")
            return
        if builder == "json":
            yield from _json_file(path, on_bad, counts)
        elif builder == "parquet":
            yield from _parquet_rows(path)
        else:
            yield from _text_lines(path)
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise DataError(f"{path}: not a complete gzip file ({err}); download or compress it again") from None


def iter_local_records(source: SourceConfig, on_bad: str, counts: dict) -> Iterator[dict]:
    """Every record of a local source: `iter_file_records` over `source_files`."""
    for path in source_files(source):
        yield from iter_file_records(path, source, on_bad, counts)


# -------------------------------------------------------------------------------------------------------------
# Reading hub datasets

_TRUE = {"1", "ON", "YES", "TRUE"}


def _offline() -> bool:
    """HF_HUB_OFFLINE as set now (`datasets` reads it once, at import)."""
    import datasets

    return os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE or bool(datasets.config.HF_HUB_OFFLINE)


def _where(source: SourceConfig) -> str:
    parts = [f"source '{source.name}': hub dataset '{source.hub_id}'"]
    details = [f"{key} {value}" for key, value in (("subset", source.subset), ("data_dir", source.data_dir),
                                                   ("split", source.split)) if value]
    return parts[0] + (f" ({', '.join(details)})" if details else "")


def _hub_failure(source: SourceConfig, err: BaseException) -> DataError:
    """One line for a hub dataset that could not be opened or read: what, which, why, and what to do."""
    cause = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:240]}"
    names = {cls.__name__ for cls in type(err).__mro__}
    text = str(err)
    remote = not Path(source.hub_id or "").expanduser().exists()
    if (remote and _offline()) or "OfflineModeIsEnabled" in names or "OfflineModeIsEnabled" in text:
        advice = ("HF_HUB_OFFLINE is set, and a hub dataset streams from the network: unset it on a machine with "
                  "network access, or point hub_id at a local copy (a folder of its data files or a save_to_disk "
                  "folder)")
    elif "GatedRepoError" in names or "gated" in text.lower():
        advice = "the dataset is gated: accept its terms on its hub page, then `hf auth login` (or set HF_TOKEN)"
    elif {"DatasetNotFoundError", "RepositoryNotFoundError", "FileNotFoundError"} & names:
        advice = ("check hub_id, subset and data_dir; a private or gated dataset needs `hf auth login` (or HF_TOKEN) "
                  "first")
    elif isinstance(err, ConnectionError) or {"ConnectError", "ConnectTimeout", "ReadTimeout", "TimeoutException",
                                              "LocalEntryNotFoundError"} & names or "couldn't reach" in text.lower():
        advice = ("the hub is unreachable: check the network (and HF_ENDPOINT / proxy settings), or point hub_id at a "
                  "local copy")
    else:
        advice = "check hub_id, subset, data_dir and split against the dataset's card"
    return DataError(f"{_where(source)} could not be read ({cause}); {advice}")


def _saved_dataset_dir(hub_id: str) -> Path | None:
    """`hub_id` as a folder written by save_to_disk (a Dataset: state.json; a DatasetDict: dataset_dict.json)."""
    path = Path(hub_id).expanduser()
    if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        return path
    return None


def _open_hub(source: SourceConfig):
    """The dataset of a hub source: an IterableDataset when streamed, else a map-style Dataset."""
    import datasets

    if not source.hub_id:
        raise DataError(f"source '{source.name}': kind hub needs hub_id")
    datasets.disable_progress_bars()
    saved = _saved_dataset_dir(source.hub_id)
    if saved is not None:
        try:
            dataset = datasets.load_from_disk(str(saved))
        except Exception as err:  # noqa: BLE001 - any failure of a local folder is one line naming it
            raise DataError(f"{_where(source)}: the save_to_disk folder is unreadable ({type(err).__name__}: "
                            f"{(str(err).splitlines() or [''])[0][:200]})") from None
        if isinstance(dataset, datasets.DatasetDict):
            if source.split not in dataset:
                raise DataError(f"{_where(source)}: the save_to_disk folder has no split '{source.split}' "
                                f"(it has {', '.join(dataset)}); set split") from None
            dataset = dataset[source.split]
        return dataset
    local = Path(source.hub_id).expanduser().exists()
    if not local and source.streaming and _offline():
        raise DataError(f"{_where(source)} cannot be streamed offline (HF_HUB_OFFLINE is set); unset HF_HUB_OFFLINE "
                        f"on a machine with network access, or point hub_id at a local copy (a folder of its data "
                        f"files or a save_to_disk folder)")
    try:
        return datasets.load_dataset(source.hub_id, source.subset, data_dir=source.data_dir, split=source.split,
                                     streaming=source.streaming)
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - `datasets` and the hub client raise many types; each is one line
        raise _hub_failure(source, err) from None


def _shards_of(dataset) -> int:
    import datasets

    if isinstance(dataset, datasets.IterableDataset):
        return max(1, dataset.num_shards)
    return max(1, len(dataset.cache_files))  # one per Arrow file of a map-style dataset


def hub_num_shards(source: SourceConfig) -> int:
    """How many independent stream shards a hub source has (`IterableDataset.num_shards`: its data files; for a
    map-style or save_to_disk dataset its Arrow files): the most read units it can be split into."""
    return _shards_of(_open_hub(source))


def iter_hub_records(source: SourceConfig, shard_index: int = 0, num_shards: int = 1) -> Iterator[dict]:
    """The records of shard `shard_index` of `num_shards` (contiguous runs of the dataset's shards, in order, so
    the shards concatenated are the whole dataset); `num_shards` may not exceed `hub_num_shards(source)`."""
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise DataError(f"{_where(source)}: shard {shard_index} of {num_shards} does not exist")
    dataset = _open_hub(source)
    if num_shards > 1:
        available = _shards_of(dataset)
        if num_shards > available:
            raise DataError(f"{_where(source)}: {num_shards} shards asked for, the dataset has {available}; ask for "
                            f"at most hub_num_shards")
        dataset = dataset.shard(num_shards=num_shards, index=shard_index, contiguous=True)
    produced = 0
    try:
        for record in dataset:
            produced += 1
            yield record
    except Exception as err:  # noqa: BLE001 - a stream can fail mid-way (network, a corrupt file): one line
        failure = _hub_failure(source, err)
        raise DataError(f"{failure} (after {produced} records of shard {shard_index} of {num_shards})") from None


def iter_texts(source: SourceConfig, on_bad: str = "skip", counts: dict | None = None) -> Iterator[str]:
    """Texts of a source, in order, honouring max_docs and (≈ 4 bytes a token) token_budget."""
    counts = counts if counts is not None else {}
    if source.kind == "builtin":
        from data_prep.builtin import builtin_texts

        records = ({"text": text} for text in builtin_texts(source.subset or "all"))
    elif source.kind == "local":
        records = iter_local_records(source, on_bad, counts)
    else:
        records = iter_hub_records(source)
    budget_bytes = source.token_budget * 4 if source.token_budget else None
    produced_docs = produced_bytes = 0
    for index, record in enumerate(records):
        try:
            text = record_to_text(record, source)
        except (KeyError, TypeError, ValueError) as err:
            if on_bad == "fail":
                raise DataError(f"source '{source.name}' record {index + 1}: {err}; fix it or use on_bad_record: skip") from None
            counts["malformed_record"] = counts.get("malformed_record", 0) + 1
            continue
        yield text
        produced_docs += 1
        produced_bytes += len(text.encode("utf-8"))
        if source.max_docs and produced_docs >= source.max_docs:
            return
        if budget_bytes and produced_bytes >= budget_bytes:
            return
