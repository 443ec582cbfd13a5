"""The MLflow tracking side, below the registry: the Tracker, runs that nest and span their work, params, datasets.

Runs are driven through MlflowClient, never MLflow's fluent (thread-bound, one-active-run) API: the trunk's run stays
open for hours while milestone and branch runs come and go, and Prefect runs tasks in worker threads.

    open_run(tracker, name, tags, parent_run_id)  a run for the length of a `with` block: nested under its parent
                                                   (mlflow.parentRunId, so the UI shows the tree), system metrics
                                                   sampled while it is open, FINISHED / FAILED / KILLED at the end
    find_run(tracker, **tags)                      the newest run carrying these genesis.* tags
    log_params / log_dataset                       params flattened and batched; datasets with a local source
"""

from __future__ import annotations

import json
import re
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from genesis.run_dir import MetricsReader
from genesis.version import code_version

EXPERIMENT = "genesis"
BASE, SFT, DPO = "genesis-base", "genesis-sft", "genesis-dpo"
MODEL_NAMES = (BASE, SFT, DPO)
PARENT_TAG = "mlflow.parentRunId"  # what MLflow's UI nests runs by
RUN_NAME_TAG = "mlflow.runName"
RUN_NOTE_TAG = "mlflow.note.content"


@dataclass(frozen=True)
class Tracker:
    """A connected MLflow client for one tracking URI and the `genesis` experiment."""

    uri: str
    experiment_id: str

    @property
    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)

    def run_link(self, run_id: str) -> str:
        """The run's page in the MLflow UI, relative to the UI's root (what a description's markdown links to)."""
        return f"#/experiments/{self.experiment_id}/runs/{run_id}"


# -------------------------------------------------------------------------------------------------------------
# Runs


def create_run(tracker: Tracker, name: str, tags: dict | None = None, parent_run_id: str | None = None,
               start_time: float | None = None) -> str:
    """A RUNNING run in the genesis experiment, nested under `parent_run_id` if given; returns its id."""
    all_tags = {"genesis.code_version": code_version(), RUN_NAME_TAG: name, **(tags or {})}
    if parent_run_id:
        all_tags[PARENT_TAG] = parent_run_id
    start_ms = int(start_time * 1000) if start_time is not None else None
    return tracker.client.create_run(tracker.experiment_id, start_time=start_ms, tags=all_tags,
                                     run_name=name).info.run_id


class SystemMetrics:
    """MLflow's own system metrics (system/cpu_utilization_percentage, memory, disk, network, GPU where there is one)
    sampled into a run while it is open. The interval is MLflow's: MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL (10 s)."""

    def __init__(self, tracker: Tracker, run_id: str):
        self.monitor = None
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self.monitor = SystemMetricsMonitor(run_id, resume_logging=True, tracking_uri=tracker.uri)
            self.monitor.start()
        except Exception as err:  # noqa: BLE001 - the run goes on without them
            warnings.warn(f"system metrics not recorded for run {run_id}: {err}", stacklevel=2)

    def stop(self) -> None:
        if self.monitor is not None:
            try:
                self.monitor.finish()
            except Exception:  # noqa: BLE001 - stopping a sampler must not fail the work it sampled
                pass


@contextmanager
def open_run(tracker: Tracker, name: str, tags: dict | None = None, parent_run_id: str | None = None,
             system_metrics: bool = True):
    """A run that lasts as long as the block: yields its id; FINISHED when the block ends, FAILED when it raises,
    KILLED when it is interrupted (a cancelled flow run, Ctrl-C)."""
    run_id = create_run(tracker, name, tags, parent_run_id)
    sampler = SystemMetrics(tracker, run_id) if system_metrics else None
    status = "KILLED"
    try:
        yield run_id
        status = "FINISHED"
    except Exception:
        status = "FAILED"
        raise
    finally:
        if sampler is not None:
            sampler.stop()
        tracker.client.set_terminated(run_id, status)


def find_runs(tracker: Tracker, status: str | None = None, **tags: str) -> list:
    """Runs of the genesis experiment carrying every `genesis.<key>` tag given, newest first."""
    clauses = [f"tags.`genesis.{key}` = '{_quote(value)}'" for key, value in tags.items()]
    if status:
        clauses.append(f"attributes.status = '{status}'")
    return tracker.client.search_runs([tracker.experiment_id], filter_string=" and ".join(clauses),
                                      order_by=["attributes.start_time DESC"], max_results=50)


def find_run(tracker: Tracker, status: str | None = None, **tags: str):
    runs = find_runs(tracker, status, **tags)
    return runs[0] if runs else None


def recorded_trunks(tracker: Tracker) -> list[str]:
    """The run directories of every trunk recorded (pretrain runs), oldest first, each once."""
    runs = tracker.client.search_runs([tracker.experiment_id], filter_string="tags.`genesis.stage` = 'pretrain'",
                                      order_by=["attributes.start_time ASC"], max_results=5000)
    return list(dict.fromkeys(run.data.tags["genesis.run_dir"] for run in runs if run.data.tags.get("genesis.run_dir")))


def _quote(value) -> str:
    return str(value).replace("'", "\\'")


# -------------------------------------------------------------------------------------------------------------
# Params and metrics


def flat_params(value, prefix: str = "", out: dict | None = None) -> dict:
    out = {} if out is None else out
    if isinstance(value, dict):
        for key, inner in value.items():
            flat_params(inner, f"{prefix}.{key}" if prefix else str(key), out)
    else:
        out[prefix] = str(value)[:500]
    return out


def log_params(tracker: Tracker, run_id: str, params: dict) -> None:
    """Nested params flattened to dotted keys, in batches MLflow accepts."""
    from mlflow.entities import Param

    items = [Param(key, value) for key, value in flat_params(params).items()]
    for start in range(0, len(items), 90):
        tracker.client.log_batch(run_id, params=items[start : start + 90])


def log_metrics(tracker: Tracker, run_id: str, metrics: dict, step: int = 0, prefix: str = "") -> None:
    """Numbers (nested dicts flattened with /) logged at `step`; anything else is skipped."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    rows = [Metric(metric_name(prefix + key), float(value), now, step) for key, value in flatten(metrics).items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value]
    for start in range(0, len(rows), 900):
        tracker.client.log_batch(run_id, metrics=rows[start : start + 900])


def flatten(row: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in row.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def metric_name(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", key)


class MetricsFollower:
    """Forward the trainer's metrics.jsonl (its metrics sink) to an MLflow run as it grows."""

    def __init__(self, metrics_path: Path, run_id: str, tracker: Tracker, from_end: bool = False):
        """`from_end`: forward only what is appended from now on (an earlier cycle's rows are logged already)."""
        self.reader = MetricsReader(metrics_path, from_end=from_end)
        self.run_id, self.tracker = run_id, tracker

    def poll(self) -> int:
        from mlflow.entities import Metric

        rows, _ = self.reader.read_new()
        metrics = []
        for row in rows:
            step = int(row["step"])
            timestamp = int(float(row.get("time", 0)) * 1000) or 0
            for key, value in flatten(row).items():
                if key not in ("step", "time") and isinstance(value, (int, float)) and value == value:
                    metrics.append(Metric(key=metric_name(key), value=float(value), timestamp=timestamp, step=step))
        for start in range(0, len(metrics), 900):
            self.tracker.client.log_batch(self.run_id, metrics=metrics[start : start + 900])
        return len(metrics)


# -------------------------------------------------------------------------------------------------------------
# Datasets: logged as inputs of the runs that read them, each with its local source


def log_dataset(tracker: Tracker, run_id: str, name: str, path: Path | None, digest: str, context: str,
                profile: dict | None = None, columns: dict[str, str] | None = None, source=None) -> None:
    """`path` (a file or a directory of shards) as an input of the run: a dataset named `name` whose source is the
    local path (or `source`, an MLflow DatasetSource, for data that is not a local file), `digest` its content hash
    (sha256 of the file, or of the shards' checksums), `profile` its counts (rows, tokens, shards; the UI shows
    them) and `columns` name → MLflow type its schema."""
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.types import ColSpec, Schema
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    source = source if source is not None else local_source(Path(path))
    dataset = _dataset(source=source, name=name, digest=digest[:36],
                              schema=Schema([ColSpec(kind, column) for column, kind in (columns or {}).items()])
                              if columns else None, profile=profile)
    tracker.client.log_inputs(run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(),
                                                             [InputTag(MLFLOW_DATASET_CONTEXT, context)])])


def manifest_datasets(data_dir: Path) -> list[dict]:
    """The token data a trunk reads: the manifest itself, then one dataset per source (its shards), as keyword
    arguments of log_dataset (without tracker, run and context)."""
    import hashlib

    from genesis.manifest import MANIFEST_NAME, read_manifest, sha256_file

    data_dir = Path(data_dir).resolve()
    manifest = read_manifest(data_dir)
    found = [{"name": "manifest", "path": data_dir / MANIFEST_NAME, "digest": sha256_file(data_dir / MANIFEST_NAME),
              "profile": {"sources": len(manifest.sources), "tokens": manifest.num_tokens,
                          "shards": sum(len(source.shards) for source in manifest.sources)}}]
    for source in manifest.sources:
        digest = hashlib.sha256(json.dumps([shard.sha256 for shard in source.shards]).encode()).hexdigest()
        found.append({"name": source.name, "path": data_dir / source.name, "digest": digest,
                      "profile": {"tokens": source.num_tokens, "docs": source.num_docs, "shards": len(source.shards),
                                  "weight": source.weight}})
    return found


def local_source(path: Path):
    from mlflow.data.sources import LocalArtifactDatasetSource

    return LocalArtifactDatasetSource(path.resolve().as_uri())


def _dataset(**kwargs):
    """A GenesisDataset; the class is built on first use (mlflow is imported only when something is tracked)."""
    from mlflow.data.meta_dataset import MetaDataset

    class GenesisDataset(MetaDataset):
        """MLflow's MetaDataset (a source, a digest, a schema) with a profile: the counts the UI shows."""

        def __init__(self, source, name, digest, schema=None, profile=None):
            self._profile = profile
            super().__init__(source=source, name=name, digest=digest, schema=schema)

        @property
        def profile(self):
            return self._profile

        def to_dict(self) -> dict:
            config = super().to_dict()
            if self._profile:
                config["profile"] = json.dumps(self._profile)
            return config

    return GenesisDataset(**kwargs)
