"""Data-stage tasks: clean + dedup (reads the sources: network for hub datasets), tokenizer, shards."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from data_prep.pipeline import stage_clean, stage_shards, stage_tokenizer
from data_prep.sources import CorpusConfig
from tasks import STAGE_CACHE


@task(name="download-clean-dedup", cache_policy=STAGE_CACHE, persist_result=True, retries=3,
      retry_delay_seconds=[10, 60, 300], timeout_seconds=6 * 3600)
def clean_dedup_task(corpus: CorpusConfig, data_dir: str) -> dict:
    # NOTE: retries with backoff because hub sources stream over the network; local sources never retry
    # into a different result (the stage's own markers skip finished work).
    report = stage_clean(corpus, Path(data_dir))
    for name, row in report.items():
        if not name.startswith("_"):
            get_run_logger().info(f"{name}: {row.get('docs_out', 0):,} docs kept "
                                  f"({row.get('exact_duplicates_removed', 0)} exact, {row.get('near_duplicates_removed', 0)} near duplicates removed)")
    return report


@task(name="train-tokenizer", cache_policy=STAGE_CACHE, persist_result=True, timeout_seconds=3 * 3600)
def tokenizer_task(corpus: CorpusConfig, data_dir: str, clean_report: dict) -> str:
    return str(stage_tokenizer(corpus, Path(data_dir)))


@task(name="tokenize-shards", cache_policy=STAGE_CACHE, persist_result=True, timeout_seconds=12 * 3600)
def shards_task(corpus: CorpusConfig, data_dir: str, tokenizer_dir: str) -> dict:
    manifest = stage_shards(corpus, Path(data_dir))
    get_run_logger().info(f"{manifest.num_tokens:,} tokens in {sum(len(s.shards) for s in manifest.sources)} shards")
    return {"tokens": manifest.num_tokens, "manifest": str(Path(data_dir) / "manifest.json")}
