"""data_flow: corpus → clean + dedup → tokenizer → token shards, recorded in MLflow."""

from __future__ import annotations

from prefect import flow

from flows.params import CORPUS, DATA_DIR, Overrides, absolute, corpus_config
from lineage.registry import connect
from tasks.data import clean_dedup_task, shards_task, tokenizer_task
from tasks.lineage import record_data_task


@flow(name="data-flow", log_prints=False)
def data_flow(corpus: str = CORPUS, data_dir: str = DATA_DIR, overrides: Overrides = (),
              tracking_uri: str | None = None) -> dict:
    """Token shards of a corpus, recorded in MLflow.

    Args:
        corpus: corpus config, configs/corpus/*.yaml (relative to the repository, or absolute)
        data_dir: where the clean text, tokenizer, token shards and manifest.json go
        overrides: dotted.key=value overrides of the corpus config, e.g. executor=serial or workers=8
        tracking_uri: MLflow tracking URI; if empty, $MLFLOW_TRACKING_URI, else SQLite in $GENESIS_HOME
            (default runs/mlflow/ in the repository)
    """
    tracker = connect(tracking_uri)  # fail before any work if lineage cannot be recorded
    config = corpus_config(corpus, overrides)

    cleaned = clean_dedup_task(config, absolute(data_dir))
    tokenized = tokenizer_task(config, cleaned)
    shards = shards_task(config, tokenized)
    run_id = record_data_task(tracker, config, shards["data_dir"])
    return {**shards, "mlflow_run_id": run_id}
