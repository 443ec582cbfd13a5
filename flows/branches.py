"""branch_flow(milestone): base → data → SFT → DPO → eval → register, one branch per milestone.

Idempotent however it is triggered (the trunk's milestone event, the milestone watcher, a person): a
complete branch is only (re)registered, a branch another run is growing is left alone, and registration
reuses existing versions. Nothing of the branch is registered before eval.json exists.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from flows.params import Overrides, absolute, branch_dir, milestone_recipe
from genesis.errors import RunDirError
from genesis.run_dir import BranchDir
from lineage.registry import connect
from tasks.branch import data_task, dpo_task, eval_task, export_task, publish_task, sft_task
from tasks.lineage import register_branch_task, register_milestone_task


@flow(name="branch-flow", log_prints=False, flow_run_name="branch {milestone}")
def branch_flow(milestone: str, branch_config: str | None = None, out: str | None = None,
                overrides: Overrides = (), tracking_uri: str | None = None) -> dict:
    """One branch off a milestone (SFT, then DPO, evaluated), registered in MLflow; published as artifacts.

    Args:
        milestone: a complete milestone checkpoint, <run_dir>/milestones/step_N
        branch_config: branch recipe, configs/branch/*.yaml (relative to the repository, or absolute); empty:
            the one the trunk's training config names (branches.recipe, with its branches.overrides)
        out: the branch directory; empty: <run_dir>/branches/step_N
        overrides: dotted.key=value overrides of the recipe, e.g. sft.max_steps=100
        tracking_uri: MLflow tracking URI; if empty, $MLFLOW_TRACKING_URI, else SQLite in $GENESIS_HOME
            (default runs/mlflow/ in the repository)
    """
    tracker = connect(tracking_uri)  # fail before any work if lineage cannot be recorded
    milestone, out = absolute(milestone), branch_dir(milestone, out)
    config = milestone_recipe(milestone, branch_config, overrides)

    base = export_task(milestone)  # a milestone that cannot grow a branch fails here, before its directory exists
    lock = BranchDir(out).lock()
    try:
        lock.acquire()
    except RunDirError:
        get_run_logger().info(f"{out}: another run is growing this branch; leaving it to that run")
        return {"branch_dir": out, "skipped": "in progress elsewhere"}
    try:
        base_version = register_milestone_task(tracker, milestone)
        branch = data_task(milestone, base, config, out)
        sft = sft_task(base, branch, config)
        dpo = dpo_task(sft, branch, config)
        scores = eval_task(base, sft, dpo, branch, config)
        versions = register_branch_task(tracker, branch, base_version)
    finally:
        lock.release()
    publish_task(tracker, branch, base_version, versions)
    get_run_logger().info(f"branch at step {scores['step']}: genesis-sft v{versions['sft']}, genesis-dpo v{versions['dpo']}")
    return {"branch_dir": out, "step": scores["step"], "base_version": base_version, "versions": versions,
            "eval": {stage: scores[stage] for stage in ("sft", "dpo")}}
