"""The source registry (configs/corpus/*.yaml) and reading records through `datasets`.

A source is a hub dataset (streamed), local files (JSONL plain or .gz, Parquet, text), or the built-in
corpus. Every record becomes one text: plain text from `text_field`, or a conversation / function-calling
record rendered with the project's chat template (so dialogues can join pretraining, as in the reference run).
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from pydantic import Field

from genesis.chat import record_to_conversation, render_chat
from genesis.config import StrictModel
from genesis.errors import DataError
from genesis.records import builder_for, resolve_paths, scan_jsonl_numbered


class SourceConfig(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    kind: Literal["hub", "local", "builtin"]
    hub_id: str | None = None
    subset: str | None = None
    split: str = "train"
    streaming: bool = True
    paths: list[str] = Field(default_factory=list, description="local files or globs, relative to the repo root")
    format: Literal["text", "chat", "function_calling", "sharegpt", "xlam"] = "text"
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
    vocab_size: int = Field(default=49_152, gt=256)
    sample_sentences: int = Field(default=200_000, gt=0)
    existing: str | None = Field(default=None, description="reuse this tokenizer (its dir, its tokenizer.model, or a "
                                                           "data dir holding tokenizer/) instead of training one")
    retrain: bool = Field(default=False, description="train a new tokenizer even though the data dir holds one "
                                                     "(a trunk trained on the old one then refuses the new shards)")


class CorpusConfig(StrictModel):
    name: str
    sources: list[SourceConfig] = Field(min_length=1)
    clean: CleanConfig = CleanConfig()
    tokenizer: TokenizerTrainConfig = TokenizerTrainConfig()
    docs_per_shard: int = Field(default=20_000, gt=0)
    workers: int = Field(default=1, ge=1)
    executor: Literal["process", "dask"] = "process"
    dask_address: str | None = None
    on_bad_record: Literal["skip", "fail"] = "skip"
    seed: int = 0


# -------------------------------------------------------------------------------------------------------------
# Rendering


def record_to_text(record: dict, source: SourceConfig) -> str:
    """One record as training text; KeyError/TypeError/ValueError mean a malformed record."""
    if source.format == "text":
        text = record[source.text_field]
        if not isinstance(text, str):
            raise TypeError(f"field '{source.text_field}' is {type(text).__name__}, not text")
        return text
    return render_chat(*record_to_conversation(record, source.format, source.messages_field))


# -------------------------------------------------------------------------------------------------------------
# Reading


def _scan_jsonl(path: Path, on_bad: str, counts: dict) -> Iterator[dict]:
    """Line-by-line JSONL reading that names the file and line of any bad record."""
    for _, record in scan_jsonl_numbered(path, on_bad, counts):
        yield record


def _first_bad_jsonl_line(path: Path) -> int | None:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", errors="strict") as handle:
        for line_number, line in enumerate(handle, start=1):
            if line.strip():
                try:
                    json.loads(line)
                except json.JSONDecodeError:
                    return line_number
    return None


def iter_local_records(source: SourceConfig, on_bad: str, counts: dict) -> Iterator[dict]:
    import datasets
    from datasets.exceptions import DatasetGenerationError

    datasets.disable_progress_bars()
    for path in resolve_paths(source.paths, source.name):
        builder = builder_for(path)
        if builder == "json":
            # `datasets` reads JSON fast but reports a bad line without its number: check first, and read
            # line by line (skipping and counting) only a file that has bad lines.
            try:
                bad_line = _first_bad_jsonl_line(path)
            except UnicodeDecodeError as err:
                raise DataError(f"{path}: not UTF-8 (byte {err.start}); re-encode the file as UTF-8") from None
            if bad_line is not None:
                if on_bad == "fail":
                    raise DataError(f"{path}:{bad_line}: invalid JSON; fix the line or use on_bad_record: skip")
                yield from _scan_jsonl(path, on_bad, counts)
                continue
        try:
            dataset = datasets.load_dataset(builder, data_files=str(path), split="train", streaming=True)
            yield from dataset
        except (DatasetGenerationError, UnicodeDecodeError) as err:
            cause = err.__cause__ or err
            if isinstance(cause, UnicodeDecodeError):
                raise DataError(f"{path}: not UTF-8; re-encode the file as UTF-8") from None
            raise DataError(f"{path}: unreadable ({str(cause).splitlines()[0][:200]}); check the file") from None


def iter_hub_records(source: SourceConfig) -> Iterator[dict]:
    import datasets

    if not source.hub_id:
        raise DataError(f"source '{source.name}': kind hub needs hub_id")
    dataset = datasets.load_dataset(source.hub_id, source.subset, split=source.split, streaming=source.streaming)
    yield from dataset


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
