"""genesis_flow: the tree. (Not named genesis.py: Prefect loads a deployment's entrypoint with `flows/` on
sys.path, where a flows/genesis.py would shadow the `genesis` package.)

genesis_flow: Data, then the trunk, and a branch at each milestone as soon as it is reached
while the trunk keeps training. milestone_watcher: the scheduled safety net that finds milestones without a
branch and launches them."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger

from flows.branch import branch_flow, default_branch_dir, grow_branch
from flows.data import data_flow
from flows.params import BranchParams, GenesisParams, WatcherParams, repo_path
from flows.pretrain import complete_milestones, run_trunk
from genesis.run_dir import BranchDir
from lineage.registry import connect, format_lineage, lineage


@flow(name="genesis-flow", log_prints=False)
def genesis_flow(params: GenesisParams = GenesisParams(), tracking_uri: str | None = None) -> dict:
    tracker = connect(tracking_uri)
    data = data_flow(params.data, tracking_uri=tracker.uri)
    pretrain = params.pretrain.model_copy(update={"data_dir": params.pretrain.data_dir or data["data_dir"]})
    branches: list[dict] = []

    def on_milestone(milestone: Path, base_version: str) -> None:
        if params.branch_milestones:
            branch = BranchParams(milestone=str(milestone), branch_config=params.branch_config,
                                  overrides=params.branch_overrides)
            branches.append(branch_flow.with_options(flow_run_name=f"branch step {milestone.name}")(
                branch, tracking_uri=tracker.uri))

    trunk = run_trunk(pretrain, tracker, on_milestone)
    tree = format_lineage(lineage(tracker))
    get_run_logger().info("lineage:\n" + tree)
    return {"data": data, "trunk": trunk, "branches": branches, "lineage": tree}


@flow(name="milestone-watcher", log_prints=False)
def milestone_watcher(params: WatcherParams = WatcherParams(), tracking_uri: str | None = None) -> list[str]:
    """Launch a branch for every complete milestone that has neither a finished nor a running branch."""
    logger = get_run_logger()
    launched = []
    for run_dir in params.run_dirs:
        for milestone in complete_milestones(repo_path(run_dir).resolve()):
            out = default_branch_dir(milestone)
            if (out / "eval.json").is_file():
                continue
            if out.is_dir() and BranchDir(out).lock().is_held_elsewhere():
                continue  # being grown right now
            branch = BranchParams(milestone=str(milestone), branch_config=params.branch_config)
            if params.launch == "deployment":
                from prefect.deployments import run_deployment

                run_deployment(params.deployment, parameters={"params": branch.model_dump(), "tracking_uri": tracking_uri},
                               timeout=0)
            else:
                grow_branch(branch, connect(tracking_uri))
            logger.info(f"launched a branch for {milestone}")
            launched.append(str(milestone))
    return launched

