"""genesis_flow: the tree. Data, then the trunk, and a branch at each milestone as soon as it is reached while
the trunk keeps training. milestone_watcher: the scheduled safety net that finds milestones without a branch
and launches them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from prefect import flow, get_run_logger

from flows.branches import branch_flow
from flows.data import data_flow
from flows.params import BRANCH_CONFIG, BRANCH_DEPLOYMENT, CORPUS, DATA_DIR, TRAIN_CONFIG, TRUNKS, Overrides, \
    Processes, Steps, absolute, trainer_overrides
from lineage.registry import connect
from tasks.branch import milestones_to_branch_task
from tasks.lineage import lineage_task
from tasks.trunk import trunk_task


@flow(name="genesis-flow", log_prints=False)
def genesis_flow(corpus: str = CORPUS, data_dir: str = DATA_DIR, corpus_overrides: Overrides = (),
                 train_config: str = TRAIN_CONFIG, run_dir: str | None = None, max_steps: Steps | None = None,
                 nproc: Processes = 2, train_overrides: Overrides = (), branch_config: str = BRANCH_CONFIG,
                 branch_overrides: Overrides = (), branch_milestones: bool = True,
                 tracking_uri: str | None = None) -> dict:
    """The tree: token shards, the trunk trained on them, and a branch off each milestone while the trunk trains.

    Args:
        corpus: corpus config, configs/corpus/*.yaml (relative to the repository, or absolute)
        data_dir: where the clean text, tokenizer, token shards and manifest.json go
        corpus_overrides: dotted.key=value overrides of the corpus config, e.g. executor=serial
        train_config: training config, configs/train/*.yaml; the trunk trains on data_dir's shards
        run_dir: the trunk's directory; empty: the training config's run_dir
        max_steps: the step this cycle trains to; raise it to continue the trunk (milestones made are kept);
            empty: the training config's max_steps
        nproc: trainer processes on this machine (torchrun ranks; the number of GPUs)
        train_overrides: dotted.key=value overrides of the training config, e.g. checkpoint.milestone_every=500
        branch_config: branch recipe for every milestone's branch, configs/branch/*.yaml
        branch_overrides: dotted.key=value overrides of the branch recipe, e.g. sft.max_steps=100
        branch_milestones: grow a branch at each milestone as it is reached
        tracking_uri: MLflow tracking URI; if empty, $MLFLOW_TRACKING_URI, else SQLite in $GENESIS_HOME
            (default runs/mlflow/ in the repository)
    """
    tracker = connect(tracking_uri)
    data = data_flow(corpus, data_dir, corpus_overrides, tracking_uri=tracker.uri)
    branches: list[dict] = []

    def grow_a_branch(milestone: Path, base_version: str) -> None:
        # Runs inside the trunk task, between two polls of the trainer, which trains on meanwhile.
        if branch_milestones:
            branches.append(branch_flow.with_options(flow_run_name=f"branch {milestone.name}")(
                str(milestone), branch_config, overrides=branch_overrides, tracking_uri=tracker.uri))

    trunk = trunk_task(absolute(train_config),
                       trainer_overrides(train_overrides, data_dir=data["data_dir"], run_dir=run_dir,
                                         max_steps=max_steps),
                       nproc, tracker, grow_a_branch)
    return {"data": data, "trunk": trunk, "branches": branches, "lineage": lineage_task(tracker)}


@flow(name="milestone-watcher", log_prints=False)
def milestone_watcher(run_dirs: Sequence[str] = TRUNKS, branch_config: str = BRANCH_CONFIG,
                      launch: Literal["deployment", "inline"] = "deployment", deployment: str = BRANCH_DEPLOYMENT,
                      tracking_uri: str | None = None) -> list[str]:
    """Launch a branch for every complete milestone that has neither a finished nor a running branch.

    Args:
        run_dirs: trunks to watch (relative to the repository, or absolute)
        branch_config: branch recipe, configs/branch/*.yaml
        launch: run each missing branch as a run of the branch deployment, or inside this flow run
        deployment: the branch deployment, flow-name/deployment-name
        tracking_uri: MLflow tracking URI; if empty, $MLFLOW_TRACKING_URI, else SQLite in $GENESIS_HOME
            (default runs/mlflow/ in the repository)
    """
    launched = []
    for run_dir in run_dirs:
        for milestone in milestones_to_branch_task(absolute(run_dir)):
            if launch == "deployment":
                from prefect.deployments import run_deployment

                run_deployment(deployment, parameters={"milestone": milestone, "branch_config": branch_config,
                                                       "tracking_uri": tracking_uri}, timeout=0)
            else:
                branch_flow(milestone, branch_config, tracking_uri=tracking_uri)
            get_run_logger().info(f"launched a branch for {milestone}")
            launched.append(milestone)
    return launched
