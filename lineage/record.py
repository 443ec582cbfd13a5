"""What each stage records in MLflow: plain functions the Prefect tasks call (and tests call directly).

    record_data       a `data` run: corpus params, the corpus's sources as inputs, per-source metrics, report + manifest
    record_milestone  a `milestone` run per milestone, nested under the trunk's run and spanning the milestone's export:
                      val losses, the export logged as an MLflow model; a genesis-base version
    record_branch     the branch's `sft` and `dpo` runs (recorded while they trained, lineage/stages.py) completed with
                      the evaluation; versions of genesis-sft and genesis-dpo whose tags and descriptions name their
                      parents
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from branch.base import export_milestone
from branch.config import EvalRecipe
from branch.evaluate import format_check
from genesis.manifest import MANIFEST_NAME
from genesis.run_dir import TRAIN_LOG, BranchDir, MetricsReader, RunDir, is_cooldown_row, read_meta
from lineage.models import log_hf_model
from lineage.registry import (BASE, DPO, FORMAT_FLAG, SFT, Tracker, code_version, existing_version,
                              register_model, version_description)
from lineage.stages import (log_stage_inputs, milestone_version, stage_description, stage_parent,  # noqa: F401
                            stage_run, stage_tags)
from lineage.tracking import (create_run, find_run, flat_params, log_dataset, log_metrics, log_params,
                              manifest_datasets, open_run)


def data_digest(data_dir: Path) -> str:
    """The manifest's sha256: it lists every shard's checksum, so it names the exact token data."""
    from genesis.manifest import sha256_file

    return sha256_file(Path(data_dir) / MANIFEST_NAME)


def params_batch(params: dict) -> list:
    from mlflow.entities import Param

    return [Param(key, value) for key, value in flat_params(params).items()]


# -------------------------------------------------------------------------------------------------------------
# Data


def record_data(tracker: Tracker, corpus_config, data_dir: Path) -> str:
    """The data run of this token data (made once per manifest digest; a rerun on the same data returns it). It
    spans the data stage as report.json times it (the stage ran before, under its own tasks); its inputs are the
    corpus's sources, each with where it was read from and the shards it became."""
    from genesis.manifest import read_manifest

    data_dir = Path(data_dir).resolve()
    digest = data_digest(data_dir)
    done = find_run(tracker, "FINISHED", stage="data", data_digest=digest)
    if done is not None:
        return done.info.run_id
    manifest = read_manifest(data_dir)
    report = _read_json(data_dir / "report.json")
    ended = (data_dir / MANIFEST_NAME).stat().st_mtime
    seconds = sum(v for v in report.get("_timings", {}).values() if isinstance(v, (int, float)))
    run_id = create_run(tracker, f"data {corpus_config.name}",
                        {"genesis.stage": "data", "genesis.data_dir": str(data_dir), "genesis.data_digest": digest,
                         "genesis.span": "the data stage, as report.json's _timings time it"},
                        start_time=ended - seconds)
    status = "FAILED"
    try:
        log_params(tracker, run_id, corpus_config.model_dump(mode="json"))
        sources = {source.name: source for source in corpus_config.sources}
        produced = {entry["name"]: entry for entry in manifest_datasets(data_dir)}
        for source in manifest.sources:
            log_metrics(tracker, run_id, {f"tokens/{source.name}": source.num_tokens, f"docs/{source.name}": source.num_docs})
            entry = produced[source.name]
            config = sources.get(source.name)
            # MLflow keeps one dataset per (name, digest): the source as read is another dataset than the shards it
            # became (the trunk's input), so its digest covers its config as well.
            read = json.dumps([config.model_dump(mode="json") if config else None, entry["digest"]], sort_keys=True)
            log_dataset(tracker, run_id, source.name, entry["path"], hashlib.sha256(read.encode()).hexdigest(),
                        context="corpus",
                        profile={**entry["profile"], "kind": getattr(config, "kind", "?")},
                        source=_corpus_source(config) if config is not None else None)
        log_metrics(tracker, run_id, {"tokens/all": manifest.num_tokens})
        for name in ("report.json", MANIFEST_NAME):
            if (data_dir / name).is_file():
                tracker.client.log_artifact(run_id, str(data_dir / name))
        status = "FINISHED"
    finally:
        tracker.client.set_terminated(run_id, status, end_time=int((ended if status == "FINISHED" else time.time()) * 1000))
    return run_id


def _corpus_source(config):
    """Where a corpus source is read from, as an MLflow dataset source: its local files, its Hub dataset, or the
    built-in texts of data_prep/builtin.py."""
    from genesis.config import REPO_ROOT
    from lineage.tracking import local_source

    if config.kind == "hub" and config.hub_id:
        from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource

        return HuggingFaceDatasetSource(config.hub_id, config_name=config.subset, data_dir=config.data_dir,
                                        split=config.split)
    if config.kind == "local" and config.paths:
        first = Path(config.paths[0])
        path = first if first.is_absolute() else REPO_ROOT / first
        while any(ch in path.name for ch in "*?[") and path != path.parent:  # a glob: the folder it searches
            path = path.parent
        return local_source(path)
    from mlflow.data.code_dataset_source import CodeDatasetSource

    return CodeDatasetSource({"module": "data_prep.builtin", "subset": config.subset or "all"})


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


# -------------------------------------------------------------------------------------------------------------
# Milestones


def val_losses_at(run_dir: Path, step: int) -> dict[str, float]:
    """The per-source validation losses of the trunk logged at or before `step`."""
    losses: dict[str, float] = {}
    for row in MetricsReader(RunDir(Path(run_dir)).metrics).all_rows():
        if row["step"] <= step and not is_cooldown_row(row):
            found = {k: v for k, v in row.items() if k.startswith("val_loss/")}
            if found:
                losses = found
    return losses


def trunk_run(tracker: Tracker, run_dir: Path):
    """The newest pretrain run of this trunk, or None."""
    return find_run(tracker, stage="pretrain", run_dir=str(Path(run_dir).resolve()))


def record_milestone(tracker: Tracker, milestone: Path, parent_run_id: str | None = None) -> str:
    """Register a milestone as a genesis-base version (idempotent); returns the version. What is registered is
    the milestone's one export (branch/base.py: fp32, the directory every branch's SFT starts from), logged as an
    MLflow model by a milestone run that spans the export, nested under the trunk's run (`parent_run_id`, else the
    trunk's newest pretrain run)."""
    milestone = Path(milestone).resolve()
    existing = existing_version(tracker, BASE, str(milestone))
    if existing is not None:
        return str(existing.version)
    run = RunDir.of_checkpoint(milestone)
    if parent_run_id is None:
        trunk = trunk_run(tracker, run.root)
        parent_run_id = trunk.info.run_id if trunk is not None else None
    meta = read_meta(milestone)
    step = int(meta.get("step", 0))
    data_dir = Path(meta.get("config", {}).get("data_dir", ""))
    digest = data_digest(data_dir) if (data_dir / MANIFEST_NAME).is_file() else "unknown"
    tags = {"genesis.stage": "milestone", "genesis.run_dir": str(run.root), "genesis.data_digest": digest,
            "genesis.milestone": str(milestone), "genesis.milestone_step": str(step)}
    with open_run(tracker, f"milestone step {step}", tags, parent_run_id) as run_id:
        hf_dir = export_milestone(milestone)
        # The trunk's follower and a branch flow may register the same milestone at once: one registers, the
        # other's run is removed below (it recorded nothing the registered one lacks).
        with run.registry_lock().held(wait=True):
            existing = existing_version(tracker, BASE, str(milestone))
            if existing is None:
                log_params(tracker, run_id, {"step": step, "tokens_seen": meta.get("tokens_seen"),
                                             "milestone": str(milestone)})
                # A milestone cooled off the trunk was evaluated after its cool-down (its meta); the trunk's
                # losses at that step are another model's.
                cooled = {f"val_loss/{name}": value for name, value in (meta.get("val_loss") or {}).items()}
                log_metrics(tracker, run_id, cooled if "cooldown" in meta else val_losses_at(run.root, step),
                            step=step)
                what = (f"Trunk milestone at step {step} of `{run.root}` ({meta.get('tokens_seen')} tokens seen), "
                        f"exported as a Hugging Face directory (fp32).")
                model_id = log_hf_model(tracker, run_id, hf_dir, "base", what)
                version, _ = register_model(tracker, BASE, model_id, run_id, {
                    "run_dir": str(run.root), "milestone_step": step, "milestone_path": str(milestone),
                    "data_digest": digest, "code_version": code_version(), "tokens_seen": meta.get("tokens_seen")},
                    version_description(tracker, what, run_id, f"milestone step {step}", parent_run_id=parent_run_id))
    if existing is not None:
        tracker.client.delete_run(run_id)
        return str(existing.version)
    return version


# -------------------------------------------------------------------------------------------------------------
# Branches


def record_branch(tracker: Tracker, branch: BranchDir, base_version: str) -> dict:
    """Register the branch's SFT and DPO models (idempotent); needs a complete branch. SFT's parent is
    `base_version` of genesis-base, DPO's the SFT version just registered.

    Each stage's run is the one recorded while it trained (lineage/stages.py), completed here with the branch's
    evaluation: its metrics, eval.json, the data report and the held-out data as evaluation inputs. A stage trained
    without a run (grown by `genesis branch` outside a flow) gets one now, from its training log, tagged
    genesis.recorded=after_training."""
    if not branch.complete:
        raise RuntimeError(f"{branch.root}: branch has no eval.json; register only complete branches")
    result = branch.read_eval()
    lineage = branch.read_record()
    milestone, step = lineage["milestone"], lineage["step"]
    versions: dict[str, str] = {}
    for name, stage, model_dir in ((SFT, "sft", branch.sft_dir), (DPO, "dpo", branch.dpo_dir)):
        existing = existing_version(tracker, name, milestone)
        if existing is not None:
            versions[stage] = str(existing.version)
            continue
        parent_name, parent_version = (BASE, base_version) if stage == "sft" else (SFT, versions["sft"])
        run = stage_run(tracker, branch, stage)
        if run is None or "genesis.model_id" not in run.data.tags:
            run_id = _record_stage_after_training(tracker, branch, stage, model_dir)
        else:
            run_id = run.info.run_id
        run = tracker.client.get_run(run_id)
        log_metrics(tracker, run_id, {k: v for k, v in result[stage].items() if isinstance(v, (int, float, dict))})
        log_stage_inputs(tracker, run_id, branch, stage, evaluation=True)
        tracker.client.log_artifact(run_id, str(branch.eval_path))
        tracker.client.log_artifact(run_id, str(branch.report), artifact_path="data")
        what = (f"{stage.upper()} of {parent_name} v{parent_version} (trunk milestone at step {step}), branch "
                f"`{Path(branch.root).resolve()}`. A chat model: its chat template carries the system prompt it was "
                f"tuned with.")
        tags = {"parent_model": parent_name, "parent_version": parent_version, "milestone_step": step,
                "milestone_path": milestone, "code_version": code_version(),
                "data_digest": lineage["data_digests"]["sft" if stage == "sft" else "dpo_train"]}
        if stage == "dpo":
            check = dpo_format_check(result)
            tags |= {FORMAT_FLAG: str(check["flagged"]).lower(), "format_drop": f"{check['drop']:.4f}"}
            if check["flagged"]:
                what += (f" Flagged: its format adherence is {check['drop']:.2f} below its SFT parent's "
                         f"({check['dpo']:.2f} vs {check['sft']:.2f}; at most {check['max_drop']:.2f} allowed), so "
                         f"neither @latest nor @champion names it unless promoted by hand.")
        version, _ = register_model(tracker, name, run.data.tags["genesis.model_id"], run_id, tags,
                                    version_description(tracker, what, run_id, run.info.run_name,
                                                        (parent_name, parent_version),
                                                        run.data.tags.get("mlflow.parentRunId")))
        versions[stage] = version
    return versions


def dpo_format_check(result: dict) -> dict:
    """eval.json's `format_check`; computed with the default threshold for a branch evaluated before it existed."""
    if "format_check" in result:
        return result["format_check"]
    return format_check(result["sft"]["format_adherence"], result["dpo"]["format_adherence"],
                        EvalRecipe().max_format_drop)


def _record_stage_after_training(tracker: Tracker, branch: BranchDir, stage: str, model_dir: Path) -> str:
    """The run of a stage that trained without one: its recipe, inputs, training log and model, recorded now."""
    tags = {**stage_tags(branch, stage), "genesis.recorded": "after_training"}
    parent = stage_parent(tracker, branch, stage)
    with open_run(tracker, f"{stage} step {branch.read_record()['step']}", tags, parent, system_metrics=False) as run_id:
        log_stage_inputs(tracker, run_id, branch, stage)
        for row in json.loads((model_dir / TRAIN_LOG).read_text()):
            log_metrics(tracker, run_id, {k: v for k, v in row.items() if k not in ("step", "epoch")},
                        step=int(row.get("step", 0)), prefix="train/")
        log_hf_model(tracker, run_id, model_dir, stage, stage_description(branch, stage))
    return run_id


__all__ = ["data_digest", "params_batch", "record_branch", "record_data", "record_milestone", "milestone_version",
           "val_losses_at"]
