"""genesis_flow: the tree. Data, then the trunk, and a branch at each milestone as soon as it is reached while
the trunk keeps training. milestone_watcher: the scheduled safety net that finds milestones without a branch
and launches them."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger

from flows.branches import branch_flow
from flows.data import data_flow
from flows.params import BranchParams, GenesisParams, WatcherParams, repo_path
from flows.pretrain import grow_trunk
from lineage.registry import connect
from tasks.branch import milestones_to_branch_task
from tasks.lineage import lineage_task


@flow(name="genesis-flow", log_prints=False)
def genesis_flow(params: GenesisParams = GenesisParams(), tracking_uri: str | None = None) -> dict:
    tracker = connect(tracking_uri)
    data = data_flow(params.data, tracking_uri=tracker.uri)
    pretrain = params.pretrain.model_copy(update={"data_dir": params.pretrain.data_dir or data["data_dir"]})
    branches: list[dict] = []

    def grow_a_branch(milestone: Path, base_version: str) -> None:
        # Runs inside the trunk task, between two polls of the trainer, which trains on meanwhile.
        if params.branch_milestones:
            branch = BranchParams(milestone=str(milestone), branch_config=params.branch_config,
                                  overrides=params.branch_overrides)
            branches.append(branch_flow.with_options(flow_run_name=f"branch {milestone.name}")(
                branch, tracking_uri=tracker.uri))

    trunk = grow_trunk(pretrain, tracker, grow_a_branch)
    return {"data": data, "trunk": trunk, "branches": branches, "lineage": lineage_task(tracker)}


@flow(name="milestone-watcher", log_prints=False)
def milestone_watcher(params: WatcherParams = WatcherParams(), tracking_uri: str | None = None) -> list[str]:
    """Launch a branch for every complete milestone that has neither a finished nor a running branch."""
    launched = []
    for run_dir in params.run_dirs:
        for milestone in milestones_to_branch_task(str(repo_path(run_dir).resolve())):
            branch = BranchParams(milestone=milestone, branch_config=params.branch_config)
            if params.launch == "deployment":
                from prefect.deployments import run_deployment

                run_deployment(params.deployment, parameters={"params": branch.model_dump(), "tracking_uri": tracking_uri},
                               timeout=0)
            else:
                branch_flow(branch, tracking_uri=tracking_uri)
            get_run_logger().info(f"launched a branch for {milestone}")
            launched.append(milestone)
    return launched
