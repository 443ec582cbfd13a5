"""MLflow lineage and the model registry: every stage a run, every milestone and branch a model version.

Tracking defaults to SQLite in the project's home (`$GENESIS_HOME`, default `<repo>/runs/mlflow`):
`mlflow ui --backend-store-uri sqlite:///<home>/mlflow.db` browses it. `MLFLOW_TRACKING_URI` or a flow's
`tracking_uri` parameter points anywhere else.

The tree lives in the registry:
  genesis-base  one version per milestone   tags: run_dir, milestone_step, milestone_path, data_digest, code_version
  genesis-sft   one version per branch      tags: parent_model=genesis-base, parent_version, milestone_step, ...
  genesis-dpo   one version per branch      tags: parent_model=genesis-sft, parent_version, milestone_step, ...
Aliases: `step-<N>` on every version. MLflow reserves the alias `latest`, so `models:/NAME@latest` is resolved
here to the newest version (MLflow's own `models:/NAME/latest` means the same).

Registration is idempotent: a milestone or branch already registered (same milestone path) returns its
existing version, so a branch triggered twice (event and watcher) registers once.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from genesis.config import REPO_ROOT
from genesis.errors import GenesisError
from genesis.run_dir import MetricsReader

EXPERIMENT = "genesis"
BASE, SFT, DPO = "genesis-base", "genesis-sft", "genesis-dpo"
MODEL_NAMES = (BASE, SFT, DPO)


class RegistryError(GenesisError):
    """The tracking server cannot be reached, or a model URI does not resolve."""


def genesis_home() -> Path:
    return Path(os.environ.get("GENESIS_HOME", REPO_ROOT / "runs" / "mlflow")).resolve()


def default_tracking_uri() -> str:
    return f"sqlite:///{genesis_home() / 'mlflow.db'}"


def tracking_uri(explicit: str | None = None) -> str:
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def code_version() -> str:
    """The git commit the code runs from (with `-dirty` if it has local changes), or `unknown`."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (commit + ("-dirty" if dirty else "")) or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@dataclass
class Tracker:
    """A connected MLflow client for one tracking URI and the `genesis` experiment."""

    uri: str
    experiment_id: str

    @property
    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)


def connect(uri: str | None = None) -> Tracker:
    """Check the tracking URI is usable and return a Tracker; one-line RegistryError if not."""
    import mlflow
    from mlflow import MlflowClient

    uri = tracking_uri(uri)
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    elif uri.startswith(("http://", "https://")):
        _check_http(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        experiment = client.get_experiment_by_name(EXPERIMENT)
        if experiment is None:
            location = None
            if uri.startswith("sqlite:///"):
                location = (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").as_uri()
            experiment_id = client.create_experiment(EXPERIMENT, artifact_location=location)
        else:
            experiment_id = experiment.experiment_id
    except Exception as err:  # noqa: BLE001 - any store failure becomes one actionable line
        raise RegistryError(f"MLflow tracking URI {uri}: unusable ({str(err).splitlines()[0][:160]}); "
                            f"fix tracking_uri or MLFLOW_TRACKING_URI") from None
    return Tracker(uri, experiment_id)


def _check_http(uri: str) -> None:
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5).read()
    except (urllib.error.URLError, OSError) as err:
        raise RegistryError(f"MLflow tracking URI {uri}: unreachable ({getattr(err, 'reason', err)}); start the "
                            f"server or fix tracking_uri / MLFLOW_TRACKING_URI") from None


# -------------------------------------------------------------------------------------------------------------
# Runs


def start_run(tracker: Tracker, name: str, tags: dict | None = None, parent_run_id: str | None = None):
    """A run in the genesis experiment. Cross-process lineage goes through tags (MLflow nests runs only
    within one process), so every run carries `genesis.stage` and, when known, `genesis.parent_run_id`."""
    import mlflow

    all_tags = {"genesis.code_version": code_version(), **(tags or {})}
    if parent_run_id:
        all_tags["genesis.parent_run_id"] = parent_run_id
    return mlflow.start_run(experiment_id=tracker.experiment_id, run_name=name, tags=all_tags)


def create_run(tracker: Tracker, name: str, tags: dict | None = None, parent_run_id: str | None = None) -> str:
    """A run driven through the client, not MLflow's fluent (thread-bound, one-active-run) API: the trunk's
    run stays open for hours while milestone and branch runs come and go in the same thread."""
    from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME

    all_tags = {"genesis.code_version": code_version(), MLFLOW_RUN_NAME: name, **(tags or {})}
    if parent_run_id:
        all_tags["genesis.parent_run_id"] = parent_run_id
    return tracker.client.create_run(tracker.experiment_id, tags=all_tags, run_name=name).info.run_id


def log_dataset_input(name: str, source_uri: str, digest: str, context: str) -> None:
    import mlflow
    from mlflow.data.http_dataset_source import HTTPDatasetSource
    from mlflow.data.meta_dataset import MetaDataset

    mlflow.log_input(MetaDataset(source=HTTPDatasetSource(source_uri), name=name, digest=digest[:36]), context=context)


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
            for key, value in _flatten(row).items():
                if key not in ("step", "time") and isinstance(value, (int, float)) and value == value:
                    metrics.append(Metric(key=_metric_name(key), value=float(value), timestamp=timestamp, step=step))
        for start in range(0, len(metrics), 900):
            self.tracker.client.log_batch(self.run_id, metrics=metrics[start : start + 900])
        return len(metrics)


def _flatten(row: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in row.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _metric_name(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", key)


# -------------------------------------------------------------------------------------------------------------
# Registry


def existing_version(tracker: Tracker, name: str, milestone_path: str):
    versions = tracker.client.search_model_versions(f"name='{name}' and tag.milestone_path='{milestone_path}'")
    return min(versions, key=lambda v: int(v.version)) if versions else None


def register_model(tracker: Tracker, name: str, model_dir: Path, run_id: str, tags: dict) -> tuple[str, bool]:
    """Register `model_dir` (already logged as the run's `model` artifact) as a version of `name`.
    Returns (version, created); a version for the same milestone path is reused, never duplicated."""
    from mlflow.exceptions import MlflowException

    client = tracker.client
    existing = existing_version(tracker, name, tags["milestone_path"])
    if existing is not None:
        return str(existing.version), False
    try:
        client.create_registered_model(name, description=_DESCRIPTIONS[name])
    except MlflowException as err:
        if "RESOURCE_ALREADY_EXISTS" not in str(err.error_code):
            raise
    artifact_uri = client.get_run(run_id).info.artifact_uri
    version = client.create_model_version(name, source=f"{artifact_uri}/model", run_id=run_id,
                                          tags={k: str(v) for k, v in tags.items()})
    client.set_registered_model_alias(name, f"step-{tags['milestone_step']}", version.version)
    return str(version.version), True


_DESCRIPTIONS = {
    BASE: "Pretrained trunk milestones (Hugging Face Llama directories). Tags name the step, run and data digest.",
    SFT: "Supervised fine-tunes branching off genesis-base milestones, shaped by configs/principles.yaml.",
    DPO: "DPO children of genesis-sft versions, preferring curious answers over hedging ones.",
}


def resolve_model_uri(uri: str, tracking: str | None = None) -> Path:
    """`models:/NAME@ALIAS`, `models:/NAME/VERSION` or `models:/NAME@latest` → a local HF model directory."""
    import mlflow
    from mlflow.exceptions import MlflowException

    match = re.fullmatch(r"models:/([^/@]+)(?:@([^/]+)|/(\d+|latest))", uri or "")
    if not match:
        raise RegistryError(f"{uri}: not a model URI; use models:/NAME@ALIAS, models:/NAME/VERSION or models:/NAME@latest")
    name, alias, version = match.groups()
    tracker = connect(tracking)
    client = tracker.client
    try:
        if alias == "latest" or version == "latest":
            versions = client.search_model_versions(f"name='{name}'")
            if not versions:
                raise RegistryError(f"{uri}: model {name} has no versions in {tracker.uri}")
            model_version = max(versions, key=lambda v: int(v.version))
        elif alias:
            model_version = client.get_model_version_by_alias(name, alias)
        else:
            model_version = client.get_model_version(name, version)
    except MlflowException as err:
        raise RegistryError(f"{uri}: not found in {tracker.uri} ({str(err).splitlines()[0][:120]}); "
                            f"`genesis lineage` lists what is registered") from None
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=model_version.source, tracking_uri=tracker.uri))


# -------------------------------------------------------------------------------------------------------------
# Lineage


def lineage(tracker: Tracker) -> list[dict]:
    """Milestones (genesis-base versions) with their branches, metrics from the registering runs."""
    client = tracker.client

    def versions(name):
        try:
            return client.search_model_versions(f"name='{name}'")
        except Exception:  # noqa: BLE001 - a registry without this model yet
            return []

    def metrics(version) -> dict:
        return client.get_run(version.run_id).data.metrics if version.run_id else {}

    sft_by_parent, dpo_by_parent = {}, {}
    for version in versions(SFT):
        sft_by_parent.setdefault(str(version.tags.get("parent_version")), []).append(version)
    for version in versions(DPO):
        dpo_by_parent.setdefault(str(version.tags.get("parent_version")), []).append(version)
    tree = []
    for base in sorted(versions(BASE), key=lambda v: int(v.tags.get("milestone_step", 0))):
        node = {"name": BASE, "version": base.version, "step": int(base.tags.get("milestone_step", 0)),
                "run_dir": base.tags.get("run_dir"), "metrics": metrics(base), "branches": []}
        for sft in sorted(sft_by_parent.get(str(base.version), []), key=lambda v: int(v.version)):
            branch = {"sft": {"version": sft.version, "metrics": metrics(sft)}, "dpo": None}
            children = dpo_by_parent.get(str(sft.version), [])
            if children:
                dpo = min(children, key=lambda v: int(v.version))
                branch["dpo"] = {"version": dpo.version, "metrics": metrics(dpo)}
            node["branches"].append(branch)
        tree.append(node)
    return tree


def format_lineage(tree: list[dict]) -> str:
    if not tree:
        return "(nothing registered yet: run `genesis demo` or the genesis flow)"
    run_dirs = sorted({node["run_dir"] or "?" for node in tree})
    lines = []
    for run_dir in run_dirs:
        lines.append(f"trunk {run_dir}")
        nodes = [n for n in tree if (n["run_dir"] or "?") == run_dir]
        for index, node in enumerate(nodes):
            last = index == len(nodes) - 1
            val = node["metrics"].get("val_loss/all")
            lines.append(f"{'└──' if last else '├──'} step {node['step']:>7}  {BASE} v{node['version']}"
                         + (f"  val_loss {val:.3f}" if val is not None else ""))
            pad = "    " if last else "│   "
            for branch in node["branches"]:
                sft, dpo = branch["sft"], branch["dpo"]
                lines.append(f"{pad}└── {SFT} v{sft['version']}{_branch_metrics(sft['metrics'])}")
                if dpo:
                    lines.append(f"{pad}    └── {DPO} v{dpo['version']}{_branch_metrics(dpo['metrics'])}")
    return "\n".join(lines)


def _branch_metrics(metrics: dict) -> str:
    parts = []
    for key, label in (("preference_accuracy", "pref_acc"), ("format_adherence", "format"), ("hedging_score", "hedging")):
        if key in metrics:
            parts.append(f"{label} {metrics[key]:.2f}")
    return ("  " + "  ".join(parts)) if parts else ""
