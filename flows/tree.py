"""genesis_flow: the tree. Data, then the trunk, and a branch at each milestone as soon as it is reached while
the trunk keeps training (or after it, when they would share GPUs). milestone_watcher: the scheduled safety net
that finds milestones without a branch and launches them on the work pool their trunk names."""

from __future__ import annotations

import contextvars
import logging
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Literal

from prefect import flow, get_run_logger

from flows.branches import branch_flow
from flows.data import data_flow
from flows.params import BRANCH_FLOW, CORPUS, DATA_DIR, TRAIN_CONFIG, Overrides, Processes, Steps, absolute, \
    branch_plan, branches_beside_trunk, trainer_overrides
from genesis.errors import GenesisError
from lineage.registry import connect
from tasks.branch import milestones_to_branch_task
from tasks.lineage import lineage_task, recorded_trunks_task
from tasks.trunk import trunk_task


BRANCH_THREAD = "genesis-branch"


class _BranchThreadTimeouts(logging.Filter):
    """Prefect warns, for every task with a timeout run off the main thread, that the timeout cannot interrupt a
    blocking call. genesis_flow's branches run in a thread of their own on purpose (the trunk's follower keeps the
    main thread), and their timeouts are day-long safety nets that take effect once a blocking call returns: true, and
    noted here rather than repeated for every task of every branch."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (threading.current_thread().name.startswith(BRANCH_THREAD)
                    and str(record.msg).startswith("Timeout of %s seconds configured for this task, but the task is "
                                                   "running in a worker thread"))


logging.getLogger("prefect.task_runs").addFilter(_BranchThreadTimeouts())


@flow(name="genesis-flow", log_prints=False)
def genesis_flow(corpus: str = CORPUS, data_dir: str = DATA_DIR, corpus_overrides: Overrides = (),
                 train_config: str = TRAIN_CONFIG, run_dir: str | None = None, max_steps: Steps | None = None,
                 nproc: Processes = 2, train_overrides: Overrides = (), branch_config: str | None = None,
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
        branch_config: branch recipe for every milestone's branch, configs/branch/*.yaml; empty: the training
            config's branches.recipe
        branch_overrides: dotted.key=value overrides of the branch recipe, e.g. sft.max_steps=100
        branch_milestones: grow a branch at each milestone in this flow run: beside the trunk (one at a time, in
            milestone order) when the training config's branches.beside_trunk says so or either trains on the CPU,
            else after the trunk has finished. A failed branch fails this flow run once the trunk has finished; the
            trunk never waits for a branch and never stops for one
        tracking_uri: MLflow tracking URI; if empty, $MLFLOW_TRACKING_URI, else SQLite in $GENESIS_HOME
            (default runs/mlflow/ in the repository)
    """
    tracker = connect(tracking_uri)
    overrides = trainer_overrides(train_overrides, max_steps=max_steps, run_dir=run_dir)
    # A bad recipe fails now, before any work.
    beside = branch_milestones and branches_beside_trunk(train_config, overrides, branch_config, branch_overrides)
    data = data_flow(corpus, data_dir, corpus_overrides, tracking_uri=tracker.uri)
    here = contextvars.copy_context()  # each branch: a subflow of this flow run, in a thread of its own
    grown: list[tuple[str, Future]] = []
    waiting: list[str] = []

    def grow(milestone: str):
        return branch_flow.with_options(flow_run_name=f"branch {Path(milestone).name}")(
            milestone, branch_config, overrides=branch_overrides, tracking_uri=tracker.uri, return_state=True)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix=BRANCH_THREAD) as branches:
        def grow_a_branch(milestone: Path, base_version: str) -> None:
            # Called by the trunk task between two reads of the trainer's output: hand the branch to the thread
            # and return at once, so the trunk's log keeps flowing and a failing branch never reaches the trunk.
            if not branch_milestones:
                return
            if beside:
                grown.append((str(milestone), branches.submit(here.copy().run, grow, str(milestone))))
            else:
                waiting.append(str(milestone))

        trunk = trunk_task(absolute(train_config), trainer_overrides(overrides, data_dir=data["data_dir"]), nproc,
                           tracker, grow_a_branch)
        for milestone in waiting:  # after the trunk: its GPUs are free now
            grown.append((milestone, branches.submit(here.copy().run, grow, milestone)))
    results, failed = [], []
    for milestone, future in grown:
        state = future.result()
        if state.is_completed():
            results.append(state.result())
        else:
            failed.append(f"{Path(milestone).name} ({state.message})")
            results.append({"milestone": milestone, "failed": state.message})
    tree = lineage_task(tracker)
    if failed:
        raise GenesisError(f"the trunk trained to step {trunk['step']}, but branch {', '.join(failed)} failed; rerun "
                           f"branch-flow for it, or let milestone-watcher launch it")
    return {"data": data, "trunk": trunk, "branches": results, "lineage": tree}


def branch_deployment(work_pool: str) -> str:
    """The branch-flow deployment on `work_pool`, as flow-name/deployment-name."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, WorkPoolFilter, WorkPoolFilterName

    with get_client(sync_client=True) as client:
        found = client.read_deployments(flow_filter=FlowFilter(name=FlowFilterName(any_=[BRANCH_FLOW])),
                                        work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[work_pool])))
    if not found:
        raise GenesisError(f"no {BRANCH_FLOW} deployment on work pool {work_pool}, which the trunk's config names for "
                           f"its branches (branches.work_pool); deploy one there (deployments/README.md)")
    return f"{BRANCH_FLOW}/{sorted(d.name for d in found)[0]}"


def waiting_branch_runs(deployment: str) -> set[str]:
    """The milestones of the deployment's runs not yet final (scheduled, pending, running, paused): a branch run
    queued on a busy pool holds no lock yet, and must not be launched again at every tick of the watcher."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (DeploymentFilter, DeploymentFilterId, FlowRunFilter,
                                                FlowRunFilterState, FlowRunFilterStateType)
    from prefect.client.schemas.objects import StateType

    waiting = FlowRunFilterStateType(any_=[StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING,
                                           StateType.PAUSED])
    with get_client(sync_client=True) as client:
        deployment_id = client.read_deployment_by_name(deployment).id
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
                                     flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=waiting)))
    return {absolute(run.parameters["milestone"]) for run in runs if run.parameters.get("milestone")}


@flow(name="milestone-watcher", log_prints=False)
def milestone_watcher(run_dirs: Sequence[str] = (), launch: Literal["deployment", "inline"] = "deployment",
                      deployment: str | None = None, tracking_uri: str | None = None) -> list[str]:
    """Launch a branch for every complete milestone that has neither a finished nor a running branch (nor a run of
    the branch deployment waiting for a worker), with the recipe and on the work pool its trunk's training config
    names (branches.recipe, branches.work_pool).

    Args:
        run_dirs: trunks to watch (relative to the repository, or absolute); empty: every trunk recorded in MLflow
        launch: run each missing branch as a run of the branch-flow deployment on the trunk's work pool, or inside
            this flow run
        deployment: the branch deployment (flow-name/deployment-name) for every trunk; empty: the branch-flow
            deployment on each trunk's branches.work_pool
        tracking_uri: MLflow tracking URI; if empty, $MLFLOW_TRACKING_URI, else SQLite in $GENESIS_HOME
            (default runs/mlflow/ in the repository)
    """
    tracker = connect(tracking_uri)
    launched = []
    for run_dir in [absolute(path) for path in run_dirs] or recorded_trunks_task(tracker):
        for milestone in milestones_to_branch_task(run_dir):
            plan = branch_plan(milestone)
            if plan.recipe is None:
                get_run_logger().info(f"{milestone}: its trunk names no branch recipe (branches.recipe); left alone")
                continue
            if launch == "deployment":
                from prefect.deployments import run_deployment

                name = deployment or branch_deployment(plan.work_pool)
                if milestone in waiting_branch_runs(name):
                    get_run_logger().info(f"{milestone}: a run of {name} for it is waiting or running; left to it")
                    continue
                run_deployment(name, parameters={"milestone": milestone, "tracking_uri": tracker.uri}, timeout=0,
                               flow_run_name=f"branch {Path(milestone).name}")
                get_run_logger().info(f"launched a branch for {milestone} ({name}, work pool {plan.work_pool})")
            else:
                branch_flow.with_options(flow_run_name=f"branch {Path(milestone).name}")(milestone,
                                                                                          tracking_uri=tracker.uri)
                get_run_logger().info(f"grew a branch for {milestone}")
            launched.append(milestone)
    return launched
