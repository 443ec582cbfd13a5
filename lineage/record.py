"""What each stage records in MLflow: plain functions the Prefect tasks call (and tests call directly).

    record_data       a `data` run: corpus params, per-source metrics, report + manifest, dataset inputs
    record_milestone  a `milestone` run per milestone: val losses, the HF export; a genesis-base version
    record_branch     `sft` and `dpo` runs: recipes, training logs, eval metrics, the models; versions of
                      genesis-sft and genesis-dpo whose tags name their parents
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from genesis.run_dir import MetricsReader, RunDir, read_meta
from lineage.registry import (BASE, DPO, SFT, Tracker, code_version, existing_version, log_dataset_input, register_model,
                              start_run)


def data_digest(data_dir: Path) -> str:
    """The manifest's sha256: it lists every shard's checksum, so it names the exact token data."""
    from genesis.manifest import sha256_file

    return sha256_file(Path(data_dir) / "manifest.json")


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
        for name in ("report.json", "manifest.json"):
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


def export_milestone(milestone: Path, run_dir: Path) -> Path:
    """The milestone as an HF directory under <run_dir>/hf/step_N (kept: milestones are immutable)."""
    from genesis_model.hf import export_hf
    from genesis_model.inference import load_checkpoint

    out = Path(run_dir) / "hf" / Path(milestone).name
    if not (out / "genesis.json").is_file():
        loaded = load_checkpoint(milestone)
        export_hf(loaded.model, out, tokenizer_dir=loaded.tokenizer_dir, extra_metadata={"source_checkpoint": str(milestone)})
    return out


def record_milestone(tracker: Tracker, milestone: Path, parent_run_id: str | None = None) -> str:
    """Register a milestone as a genesis-base version (idempotent); returns the version."""
    milestone = Path(milestone).resolve()
    # The trunk's follower and a branch flow may register the same milestone at once.
    with RunDir.of_checkpoint(milestone).registry_lock().held(wait=True):
        return _record_milestone(tracker, milestone, parent_run_id)


def _record_milestone(tracker: Tracker, milestone: Path, parent_run_id: str | None) -> str:
    import mlflow

    existing = existing_version(tracker, BASE, str(milestone))
    if existing is not None:
        return str(existing.version)
    meta = read_meta(milestone)
    run_dir = Path(meta.get("config", {}).get("run_dir", milestone.parent.parent)).resolve()
    data_dir = Path(meta.get("config", {}).get("data_dir", ""))
    digest = data_digest(data_dir) if (data_dir / "manifest.json").is_file() else "unknown"
    step = int(meta.get("step", 0))
    hf_dir = export_milestone(milestone, run_dir)
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


def record_branch(tracker: Tracker, branch, base_version: str, parent_run_id: str | None = None) -> dict:
    """Log the branch's SFT and DPO runs and register both (idempotent); needs a complete branch."""
    import mlflow


    if not branch.complete:
        raise RuntimeError(f"{branch.out}: branch has no eval.json; register only complete branches")
    result = json.loads(branch.eval_path.read_text())
    lineage = json.loads((branch.out / "branch.json").read_text())
    milestone = str(branch.milestone)
    versions = {}
    for name, stage, model_dir, parent in ((SFT, "sft", branch.sft_dir, (BASE, base_version)),
                                           (DPO, "dpo", branch.dpo_dir, None)):
        existing = existing_version(tracker, name, milestone)
        if existing is not None:
            versions[stage] = str(existing.version)
            continue
        parent_name, parent_version = parent if parent else (SFT, versions["sft"])
        tags = {"genesis.stage": stage, "genesis.branch_dir": str(branch.out), "genesis.milestone": milestone}
        with start_run(tracker, f"{stage} step {branch.step}", tags, parent_run_id) as run:
            log_params({"recipe": lineage["config"][stage], "data_digests": lineage["data_digests"],
                        "milestone_step": branch.step})
            for key, value in result[stage].items():
                if isinstance(value, (int, float)):
                    mlflow.log_metric(key, value)
                elif isinstance(value, dict):
                    for inner, number in value.items():
                        mlflow.log_metric(f"{key}/{inner}", number)
            for row in json.loads((model_dir / "train_log.json").read_text()):
                for key, value in row.items():
                    if key not in ("step", "epoch") and isinstance(value, (int, float)):
                        mlflow.log_metric(f"train/{key}", value, step=int(row.get("step", 0)))
            mlflow.log_artifact(str(branch.eval_path))
            mlflow.log_artifact(str(branch.data_dir / "report.json"), artifact_path="data")
            mlflow.log_artifacts(str(model_dir), artifact_path="model")
            version, _ = register_model(tracker, name, model_dir, run.info.run_id, {
                "parent_model": parent_name, "parent_version": parent_version, "milestone_step": branch.step,
                "milestone_path": milestone, "data_digest": lineage["data_digests"]["sft" if stage == "sft" else "dpo_train"],
                "code_version": code_version()})
        versions[stage] = version
    return versions
