"""What each stage records in MLflow: plain functions the Prefect tasks call (and tests call directly).

    record_data       a `data` run: corpus params, per-source metrics, report + manifest, dataset inputs
    record_milestone  a `milestone` run per milestone: val losses, its one HF export; a genesis-base version
    record_branch     `sft` and `dpo` runs: recipes, training logs, eval metrics, the models; versions of
                      genesis-sft and genesis-dpo whose tags name their parents
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from branch.base import export_milestone
from genesis.manifest import MANIFEST_NAME
from genesis.run_dir import TRAIN_LOG, BranchDir, MetricsReader, RunDir, read_meta
from lineage.registry import (BASE, DPO, SFT, Tracker, code_version, existing_version, log_dataset_input, register_model,
                              start_run)


def data_digest(data_dir: Path) -> str:
    """The manifest's sha256: it lists every shard's checksum, so it names the exact token data."""
    from genesis.manifest import sha256_file

    return sha256_file(Path(data_dir) / MANIFEST_NAME)


def _flat_params(prefix: str, value, out: dict) -> dict:
    if isinstance(value, dict):
        for key, inner in value.items():
            _flat_params(f"{prefix}.{key}" if prefix else str(key), inner, out)
    else:
        out[prefix] = str(value)[:500]
    return out


def params_batch(params: dict) -> list:
    from mlflow.entities import Param

    return [Param(key, value) for key, value in _flat_params("", params, {}).items()]


def log_params(params: dict) -> None:
    import mlflow

    items = list(_flat_params("", params, {}).items())
    for start in range(0, len(items), 90):
        mlflow.log_params(dict(items[start : start + 90]))


def record_data(tracker: Tracker, corpus_config, data_dir: Path) -> str:
    """Log a data run; returns its run id."""
    import mlflow

    from genesis.manifest import read_manifest

    data_dir = Path(data_dir).resolve()
    manifest = read_manifest(data_dir)
    digest = data_digest(data_dir)
    with start_run(tracker, f"data {corpus_config.name}", {"genesis.stage": "data", "genesis.data_dir": str(data_dir),
                                                          "genesis.data_digest": digest}) as run:
        log_params(corpus_config.model_dump(mode="json"))
        for source in manifest.sources:
            mlflow.log_metric(f"tokens/{source.name}", source.num_tokens)
            mlflow.log_metric(f"docs/{source.name}", source.num_docs)
            source_digest = json.dumps([shard.sha256 for shard in source.shards])
            log_dataset_input(source.name, (data_dir / source.name).as_uri(),
                              hashlib.sha256(source_digest.encode()).hexdigest(), context="pretraining")
        mlflow.log_metric("tokens/all", manifest.num_tokens)
        for name in ("report.json", MANIFEST_NAME):
            if (data_dir / name).is_file():
                mlflow.log_artifact(str(data_dir / name))
        return run.info.run_id


def val_losses_at(run_dir: Path, step: int) -> dict[str, float]:
    """The per-source validation losses logged at or before `step` (the milestone's own evaluation)."""
    losses: dict[str, float] = {}
    for row in MetricsReader(RunDir(Path(run_dir)).metrics).all_rows():
        if row["step"] <= step:
            found = {k: v for k, v in row.items() if k.startswith("val_loss/")}
            if found:
                losses = found
    return losses


def record_milestone(tracker: Tracker, milestone: Path, parent_run_id: str | None = None) -> str:
    """Register a milestone as a genesis-base version (idempotent); returns the version. What is registered is
    the milestone's one export (branch/base.py: fp32, the directory every branch's SFT starts from)."""
    milestone = Path(milestone).resolve()
    existing = existing_version(tracker, BASE, str(milestone))
    if existing is not None:
        return str(existing.version)
    hf_dir = export_milestone(milestone)
    # The trunk's follower and a branch flow may register the same milestone at once.
    with RunDir.of_checkpoint(milestone).registry_lock().held(wait=True):
        return _record_milestone(tracker, milestone, hf_dir, parent_run_id)


def _record_milestone(tracker: Tracker, milestone: Path, hf_dir: Path, parent_run_id: str | None) -> str:
    import mlflow

    existing = existing_version(tracker, BASE, str(milestone))
    if existing is not None:
        return str(existing.version)
    meta = read_meta(milestone)
    run_dir = RunDir.of_checkpoint(milestone).root
    data_dir = Path(meta.get("config", {}).get("data_dir", ""))
    digest = data_digest(data_dir) if (data_dir / MANIFEST_NAME).is_file() else "unknown"
    step = int(meta.get("step", 0))
    tags = {"genesis.stage": "milestone", "genesis.run_dir": str(run_dir), "genesis.data_digest": digest}
    with start_run(tracker, f"milestone step {step}", tags, parent_run_id) as run:
        mlflow.log_params({"step": step, "tokens_seen": meta.get("tokens_seen"), "milestone": str(milestone)})
        for key, value in val_losses_at(run_dir, step).items():
            mlflow.log_metric(key, value, step=step)
        mlflow.log_artifacts(str(hf_dir), artifact_path="model")
        version, _ = register_model(tracker, BASE, hf_dir, run.info.run_id, {
            "run_dir": str(run_dir), "milestone_step": step, "milestone_path": str(milestone),
            "data_digest": digest, "code_version": code_version(), "tokens_seen": meta.get("tokens_seen")})
    return version


def record_branch(tracker: Tracker, branch: BranchDir, base_version: str, parent_run_id: str | None = None) -> dict:
    """Log the branch's SFT and DPO runs and register both (idempotent); needs a complete branch. SFT's parent is
    `base_version` of genesis-base, DPO's the SFT version just registered."""
    import mlflow

    if not branch.complete:
        raise RuntimeError(f"{branch.root}: branch has no eval.json; register only complete branches")
    result = branch.read_eval()
    lineage = branch.read_record()
    milestone, step = lineage["milestone"], lineage["step"]
    versions = {}
    for name, stage, model_dir, parent in ((SFT, "sft", branch.sft_dir, (BASE, base_version)),
                                           (DPO, "dpo", branch.dpo_dir, None)):
        existing = existing_version(tracker, name, milestone)
        if existing is not None:
            versions[stage] = str(existing.version)
            continue
        parent_name, parent_version = parent if parent else (SFT, versions["sft"])
        tags = {"genesis.stage": stage, "genesis.branch_dir": str(branch.root), "genesis.milestone": milestone}
        with start_run(tracker, f"{stage} step {step}", tags, parent_run_id) as run:
            log_params({"recipe": lineage["config"][stage], "data_digests": lineage["data_digests"],
                        "milestone_step": step, "base": lineage.get("base")})
            for key, value in result[stage].items():
                if isinstance(value, (int, float)):
                    mlflow.log_metric(key, value)
                elif isinstance(value, dict):
                    for inner, number in value.items():
                        mlflow.log_metric(f"{key}/{inner}", number)
            for row in json.loads((model_dir / TRAIN_LOG).read_text()):
                for key, value in row.items():
                    if key not in ("step", "epoch") and isinstance(value, (int, float)):
                        mlflow.log_metric(f"train/{key}", value, step=int(row.get("step", 0)))
            mlflow.log_artifact(str(branch.eval_path))
            mlflow.log_artifact(str(branch.report), artifact_path="data")
            mlflow.log_artifacts(str(model_dir), artifact_path="model")
            version, _ = register_model(tracker, name, model_dir, run.info.run_id, {
                "parent_model": parent_name, "parent_version": parent_version, "milestone_step": step,
                "milestone_path": milestone, "data_digest": lineage["data_digests"]["sft" if stage == "sft" else "dpo_train"],
                "code_version": code_version()})
        versions[stage] = version
    return versions
