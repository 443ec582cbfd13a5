"""The trunk as one task: lineage.follow_trunk under Prefect, the trainer's output in the task's log, a progress
artifact at the trainer's step, each milestone registered (as a register-milestone task) and announced with a
`genesis.milestone.completed` event, which the branch deployment's trigger answers. Cancelling the flow run stops
the trainer's whole process group.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event

from genesis.config import REPO_ROOT, TrainConfig, branch_plan_of, load_config
from genesis.run_dir import RunDir, read_meta, step_of
from lineage.registry import Tracker
from lineage.trunk import follow_trunk
from serve.plots import plot_run
from tasks.artifacts import TrunkProgress
from tasks.lineage import register_milestone_task

MILESTONE_EVENT = "genesis.milestone.completed"


BRANCH_POOL_LABEL = "genesis.branch.work-pool"  # the trigger of the branch deployment on that pool matches it


def milestone_event(milestone: Path, tracking_uri: str | None = None) -> dict:
    """The `genesis.milestone.completed` event of a complete milestone: the milestone, its trunk (run directory and
    saved config, the MLflow store it registers into) and how the trunk branches (its config's `branches`: recipe,
    overrides, work pool). The resource carries the work pool as a label, so only the branch deployment on that
    pool answers."""
    milestone = Path(milestone).resolve()
    run, step = RunDir.of_checkpoint(milestone), step_of(milestone.name)
    plan = branch_plan_of(read_meta(milestone).get("config"), str(milestone))
    recipe = None if plan.recipe is None else str(plan.recipe if plan.recipe.is_absolute() else REPO_ROOT / plan.recipe)
    return {"event": MILESTONE_EVENT,
            "resource": {"prefect.resource.id": f"genesis.milestone.{run.root.name}.{step}",
                         "prefect.resource.name": f"{run.root.name} step {step}",
                         BRANCH_POOL_LABEL: plan.work_pool if recipe else ""},
            "payload": {"milestone": str(milestone), "step": step, "run_dir": str(run.root),
                        "train_config": str(run.config), "branch_config": recipe,
                        "branch_overrides": list(plan.overrides), "work_pool": plan.work_pool,
                        "tracking_uri": tracking_uri}}


def emit_milestone_event(milestone: Path, tracking_uri: str | None = None) -> None:
    emit_event(**milestone_event(milestone, tracking_uri))


def plot_curves(run_dir: Path) -> Path | None:
    return plot_run(run_dir, RunDir(run_dir).curves)


# NOTE: never cached (the trainer itself resumes from its last checkpoint) and no timeout: a trunk trains for days.
@task(name="trunk", cache_policy=NO_CACHE)
def trunk_task(train_config: str, overrides: list[str], nproc: int, tracker: Tracker,
               on_milestone: Callable[[Path, str], None] | None = None) -> dict:
    """The trunk trained to the config's max_steps; `on_milestone(milestone, base_version)` runs for each new
    milestone while the trainer keeps going. Returns what lineage.follow_trunk did."""
    config = load_config(TrainConfig, Path(train_config), list(overrides))
    progress = TrunkProgress(config.run_dir.resolve(), config.max_steps)  # refreshed as the trainer logs

    def log(line: str) -> None:
        get_run_logger().info(line)
        progress.update()

    def reached(milestone: Path, base_version: str) -> None:
        emit_milestone_event(milestone, tracker.uri)
        if on_milestone is not None:
            on_milestone(milestone, base_version)

    result = follow_trunk(Path(train_config), overrides, nproc, tracker, on_milestone=reached, log=log,
                          plot=plot_curves, register=register_milestone_task)
    progress.update(force=True)
    return result
