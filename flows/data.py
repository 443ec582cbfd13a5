"""data_flow: corpus → clean + dedup → tokenizer → token shards, recorded in MLflow."""

from __future__ import annotations

from prefect import flow

from flows.params import DataParams
from lineage.registry import connect
from tasks.data import clean_dedup_task, shards_task, tokenizer_task
from tasks.lineage import record_data_task


@flow(name="data-flow", log_prints=False)
def data_flow(params: DataParams = DataParams(), tracking_uri: str | None = None) -> dict:
    tracker = connect(tracking_uri)  # fail before any work if lineage cannot be recorded
    corpus = params.corpus_config()

    cleaned = clean_dedup_task(corpus, params.data_path())
    tokenized = tokenizer_task(corpus, cleaned)
    shards = shards_task(corpus, tokenized)
    run_id = record_data_task(tracker, corpus, shards["data_dir"])
    return {**shards, "mlflow_run_id": run_id}
