"""Data-stage tasks: clean + dedup (reads the sources: network for hub datasets), tokenizer, shards.

Each takes the data directory as the step before left it and returns it with its own output added, so the
three run in order and each is refreshed when its output is gone (data_prep.finished).
"""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger

from data_prep import finished, stage_clean, stage_shards, stage_tokenizer
from data_prep.sources import CorpusConfig
from tasks import stage_task


@stage_task(done=lambda corpus, data_dir: finished(corpus, data_dir, "clean"), name="download-clean-dedup",
            retries=3, retry_delay_seconds=[10, 60, 300], timeout_seconds=6 * 3600)
def clean_dedup_task(corpus: CorpusConfig, data_dir: str) -> str:
    """The data directory with the sources' clean, deduplicated text and its report."""
    # NOTE: retries with backoff because hub sources stream over the network; local sources never retry
    # into a different result (the stage's own markers skip finished work).
    report = stage_clean(corpus, Path(data_dir))
    for name, row in report.items():
        if not name.startswith("_"):
            get_run_logger().info(f"{name}: {row.get('docs_out', 0):,} docs kept "
                                  f"({row.get('exact_duplicates_removed', 0)} exact, {row.get('near_duplicates_removed', 0)} near duplicates removed)")
    return data_dir


@stage_task(done=lambda corpus, data_dir: finished(corpus, data_dir, "tokenizer"), name="train-tokenizer",
            timeout_seconds=3 * 3600)
def tokenizer_task(corpus: CorpusConfig, data_dir: str) -> str:
    """The data directory with a tokenizer trained on its clean text."""
    get_run_logger().info(f"tokenizer: {stage_tokenizer(corpus, Path(data_dir))}")
    return data_dir


@stage_task(done=lambda corpus, data_dir: finished(corpus, data_dir, "shards"), name="tokenize-shards",
            timeout_seconds=12 * 3600)
def shards_task(corpus: CorpusConfig, data_dir: str) -> dict:
    """The data directory with token shards and manifest.json, and how many tokens they hold."""
    manifest = stage_shards(corpus, Path(data_dir))
    get_run_logger().info(f"{manifest.num_tokens:,} tokens in {sum(len(s.shards) for s in manifest.sources)} shards")
    return {"data_dir": data_dir, "tokens": manifest.num_tokens}
