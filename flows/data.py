"""data_flow: corpus → clean + dedup → tokenizer → token shards, recorded in MLflow."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from data_prep.sources import CorpusConfig
from flows.params import DataParams, repo_path
from genesis.config import load_config
from lineage.registry import connect
from tasks import refresh_if_missing
from tasks.data import clean_dedup_task, shards_task, tokenizer_task
from tasks.lineage import record_data_task


@flow(name="data-flow", log_prints=False)
def data_flow(params: DataParams = DataParams(), tracking_uri: str | None = None) -> dict:
    tracker = connect(tracking_uri)  # fail before any work if lineage cannot be recorded
    corpus = load_config(CorpusConfig, repo_path(params.corpus), params.overrides)
    data_dir = repo_path(params.data_dir).resolve()
    stages = data_dir / ".stages"

    report = refresh_if_missing(clean_dedup_task, stages / "clean.json")(corpus, str(data_dir))
    tokenizer_dir = refresh_if_missing(tokenizer_task, stages / "tokenizer.json")(corpus, str(data_dir), report)
    shards = refresh_if_missing(shards_task, data_dir / "manifest.json")(corpus, str(data_dir), tokenizer_dir)
    run_id = record_data_task(tracker, corpus, str(data_dir))
    return {**shards, "data_dir": str(data_dir), "mlflow_run_id": run_id}
