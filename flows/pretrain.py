"""pretrain_flow: the trunk. Launches `torchrun -m genesis_model.train`, streams its log into Prefect,
follows metrics.jsonl into MLflow, and at each complete milestone registers it and emits an event.

Cancelling the flow run stops the trainer's whole process group (see genesis.launch). Rerunning resumes
from the last checkpoint; a higher `max_steps` continues the same trunk and adds milestones.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.events import emit_event

from flows.params import PretrainParams, repo_path
from genesis.config import TrainConfig, load_config
from genesis.errors import GenesisError
from genesis.run_dir import RunDir
from genesis_model.launch import StopOnSignals, TrainerProcess, trainer_command
from serve.plots import plot_run
from lineage.registry import MetricsFollower, Tracker, connect, create_run
from tasks.lineage import register_milestone_task

MILESTONE_EVENT = "genesis.milestone.completed"


def train_overrides(params: PretrainParams) -> list[str]:
    overrides = list(params.overrides)
    for key in ("data_dir", "run_dir", "max_steps"):
        value = getattr(params, key)
        if value is not None:
            overrides.append(f"{key}={repo_path(value).resolve() if key != 'max_steps' else value}")
    return overrides


def complete_milestones(run_dir: Path) -> list[Path]:
    return RunDir(run_dir).milestones()


def emit_milestone_event(milestone: Path, run_dir: Path) -> None:
    step = int(milestone.name.removeprefix("step_"))
    emit_event(event=MILESTONE_EVENT,
               resource={"prefect.resource.id": f"genesis.milestone.{run_dir.name}.{step}",
                         "prefect.resource.name": f"{run_dir.name} step {step}"},
               payload={"milestone": str(milestone), "run_dir": str(run_dir), "step": step})


def run_trunk(params: PretrainParams, tracker: Tracker, on_milestone: Callable[[Path, str], None] | None = None) -> dict:
    """The pretraining loop shared by pretrain_flow and genesis_flow; `on_milestone(path, base_version)`
    runs for each new milestone while the trainer keeps going in its own processes."""
    logger = get_run_logger()
    config_path = repo_path(params.train_config)
    overrides = train_overrides(params)
    config = load_config(TrainConfig, config_path, overrides)
    run_dir = config.run_dir.resolve()
    if not run_dir.parent.exists():
        raise GenesisError(f"run_dir {run_dir}: parent directory does not exist; create it or choose another run_dir")
    if run_dir.exists():  # refuse a trunk another trainer holds, before starting anything
        with RunDir(run_dir).train_lock().held():
            pass
    handled = {p.resolve() for p in complete_milestones(run_dir)}  # earlier cycles' milestones are registered already
    from lineage.record import params_batch

    run_id = create_run(tracker, f"pretrain {run_dir.name}", {"genesis.stage": "pretrain", "genesis.run_dir": str(run_dir)})
    status = "FAILED"
    try:
        tracker.client.log_batch(run_id, params=params_batch(config.model_dump(mode="json")))
        follower = MetricsFollower(RunDir(run_dir).metrics, run_id, tracker, from_end=True)
        for milestone in sorted(handled):  # a resumed trunk: make sure earlier milestones are in the registry
            register_milestone_task(tracker, str(milestone), run_id)
        trainer = TrainerProcess(trainer_command(config_path, overrides, params.nproc, trainer_args=["--resume", "auto"]))
        logger.info(f"trainer started (pid {trainer.pid}): {' '.join(trainer.command)}")

        def new_milestones() -> None:
            for milestone in complete_milestones(run_dir):
                if milestone.resolve() in handled:
                    continue
                handled.add(milestone.resolve())
                version = register_milestone_task(tracker, str(milestone), run_id)
                emit_milestone_event(milestone, run_dir)
                logger.info(f"milestone {milestone.name} registered as genesis-base v{version}")
                if on_milestone:
                    on_milestone(milestone, version)

        last_poll = 0.0
        with StopOnSignals(trainer):
            for line in trainer.lines(timeout=1.0):
                if line:
                    logger.info(line)
                if time.time() - last_poll < 2.0 and line is not None:
                    continue
                last_poll = time.time()
                follower.poll()
                new_milestones()
        follower.poll()
        if trainer.returncode != 0:
            raise GenesisError(f"trainer exited with {trainer.returncode}; see the log above and "
                               f"{run_dir / 'events.jsonl'}; rerun the flow to resume from the last checkpoint")
        new_milestones()  # one saved in the very last step
        image = plot_run(run_dir, run_dir / "loss.png")
        if image is not None:
            tracker.client.log_artifact(run_id, str(image))
        status = "FINISHED"
    finally:
        tracker.client.set_terminated(run_id, status)
    latest = json.loads((run_dir / "latest.json").read_text()) if (run_dir / "latest.json").is_file() else {}
    return {"run_dir": str(run_dir), "step": latest.get("step"), "val_loss": latest.get("val_loss", {}),
            "milestones": [str(p) for p in complete_milestones(run_dir)], "mlflow_run_id": run_id}


@flow(name="pretrain-flow", log_prints=False)
def pretrain_flow(params: PretrainParams = PretrainParams(), tracking_uri: str | None = None) -> dict:
    return run_trunk(params, connect(tracking_uri))
