"""branch_flow(milestone): export → data → SFT → DPO → eval → register, one branch per milestone.

Idempotent however it is triggered (the trunk's milestone event, the milestone watcher, a person): a
complete branch is only (re)registered, a branch another run is growing is left alone, and registration
reuses existing versions. Nothing is registered before eval.json exists.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger

from flows.params import BranchParams, repo_path
from branch.config import BranchConfig
from branch.pipeline import Branch
from genesis.config import load_config
from genesis.errors import RunDirError
from lineage.registry import Tracker, connect
from tasks import refresh_if_missing
from tasks.branch import data_task, dpo_task, eval_task, export_task, sft_task
from tasks.lineage import register_branch_task, register_milestone_task


def default_branch_dir(milestone: Path) -> Path:
    """<run_dir>/branches/step_N for <run_dir>/milestones/step_N."""
    return milestone.parent.parent / "branches" / milestone.name


def grow_branch(params: BranchParams, tracker: Tracker, base_version: str | None = None) -> dict:
    logger = get_run_logger()
    milestone = repo_path(params.milestone).resolve()
    config = load_config(BranchConfig, repo_path(params.branch_config), params.overrides)
    out = repo_path(params.out).resolve() if params.out else default_branch_dir(milestone)
    branch = Branch(milestone, config, out, log=logger.info)  # checks the milestone and the chat template
    lock = branch.lock()
    try:
        lock.acquire()
    except RunDirError:
        logger.info(f"{out}: another run is growing this branch; leaving it to that run")
        return {"branch_dir": str(out), "skipped": "in progress elsewhere"}
    try:
        if base_version is None:
            base_version = register_milestone_task(tracker, str(milestone))
        args = (str(milestone), config, str(out))
        base_dir = refresh_if_missing(export_task, branch.base_dir / "genesis.json")(*args)
        totals = refresh_if_missing(data_task, branch.data_dir / "report.json")(*args, base_dir)
        sft_dir = refresh_if_missing(sft_task, branch.sft_dir / "genesis_stage.json")(*args, totals)
        dpo_dir = refresh_if_missing(dpo_task, branch.dpo_dir / "genesis_stage.json")(*args, sft_dir)
        result = refresh_if_missing(eval_task, branch.eval_path)(*args, dpo_dir)
        versions = register_branch_task(tracker, branch, base_version)
    finally:
        lock.release()
    logger.info(f"branch at step {branch.step}: genesis-sft v{versions['sft']}, genesis-dpo v{versions['dpo']}")
    return {"branch_dir": str(out), "step": branch.step, "base_version": base_version, "versions": versions,
            "eval": {stage: {k: result[stage][k] for k in ("preference_accuracy", "format_adherence", "hedging_score")}
                     for stage in ("sft", "dpo")}}


@flow(name="branch-flow", log_prints=False, flow_run_name="branch {params.milestone}")
def branch_flow(params: BranchParams, tracking_uri: str | None = None) -> dict:
    return grow_branch(params, connect(tracking_uri))
