"""The trunk, followed: launch the trainer, forward its metrics to MLflow, register each milestone as it lands.

    follow_trunk(config_path, overrides, nproc, tracker, on_milestone=..., log=..., plot=...) -> dict

Plain Python (no Prefect): the pretrain task runs it with Prefect's logger and an event per milestone, and it
runs as well from a script. The trainer is `torchrun -m genesis_model.train --resume auto` in its own process
group, stopped with this process (genesis_model/launch.py); rerunning resumes from the last checkpoint, and a
higher `max_steps` continues the same trunk and adds milestones.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

from genesis.config import TrainConfig, load_config
from genesis.errors import GenesisError
from genesis.run_dir import RunDir
from genesis_model.launch import StopOnSignals, TrainerProcess, trainer_command
from lineage.record import params_batch, record_milestone
from lineage.tracking import (MetricsFollower, SystemMetrics, Tracker, create_run, find_run, log_dataset,
                              manifest_datasets)

POLL_SECONDS = 2.0


def follow_trunk(config_path: Path, overrides: Sequence[str], nproc: int, tracker: Tracker, *,
                 on_milestone: Callable[[Path, str], None] | None = None, log: Callable[[str], None] = print,
                 plot: Callable[[Path], Path | None] | None = None,
                 register: Callable[[Tracker, Path, str], str] = record_milestone) -> dict:
    """Train the trunk configured by `config_path` + `overrides` on `nproc` local ranks, and follow it.

    Each new complete milestone is registered (`register`, record_milestone by default) and then handed to
    `on_milestone(milestone, base_version)` while the trainer keeps going in its own processes; it runs between
    two reads of the trainer's output, so it should return quickly, and an error in it is logged, never raised:
    the trainer is not stopped for it. Every trainer
    line goes to `log`. At the end `plot(run_dir)` may draw the curves (an image logged to the run). Returns
    the run directory, its last step and validation losses, all its milestones, those registered in this
    cycle (path → genesis-base version) and the MLflow run."""
    config = load_config(TrainConfig, config_path, list(overrides))
    run = RunDir(config.run_dir.resolve())
    if not run.root.parent.exists():
        raise GenesisError(f"run_dir {run.root}: parent directory does not exist; create it or choose another run_dir")
    if run.root.exists():  # refuse a trunk another trainer holds, before starting anything
        with run.train_lock().held():
            pass
    earlier = {path.resolve() for path in run.milestones()}  # made by earlier cycles: registered already
    handled, registered = set(earlier), {}
    previous = find_run(tracker, stage="pretrain", run_dir=str(run.root))
    tags = {"genesis.stage": "pretrain", "genesis.run_dir": str(run.root)}
    if previous is not None:  # a later cycle of the same trunk: its own run, linked to the one before
        tags["genesis.previous_cycle_run_id"] = previous.info.run_id
    run_id = create_run(tracker, f"pretrain {run.root.name}", tags)
    sampler = SystemMetrics(tracker, run_id)
    status = "KILLED"
    try:
        params = params_batch(config.model_dump(mode="json"))
        for start in range(0, len(params), 90):
            tracker.client.log_batch(run_id, params=params[start : start + 90])
        data_dir = Path(config.data_dir).resolve()
        if (data_dir / "manifest.json").is_file():  # the trunk reads the manifest and each source's shards
            for dataset in manifest_datasets(data_dir):
                log_dataset(tracker, run_id, context="pretraining", **dataset)
        follower = MetricsFollower(run.metrics, run_id, tracker, from_end=True)
        for milestone in sorted(earlier):  # a resumed trunk: make sure earlier milestones are in the registry
            register(tracker, milestone, run_id)
        trainer = TrainerProcess(trainer_command(config_path, list(overrides), nproc, trainer_args=["--resume", "auto"]))
        log(f"trainer started (pid {trainer.pid}): {' '.join(trainer.command)}")

        def new_milestones() -> None:
            for milestone in run.milestones():
                if milestone.resolve() in handled:
                    continue
                handled.add(milestone.resolve())
                version = registered[str(milestone)] = register(tracker, milestone, run_id)
                log(f"milestone {milestone.name} registered as genesis-base v{version}")
                if on_milestone:
                    try:
                        on_milestone(milestone, version)
                    except Exception as err:  # the trunk trains on whatever a milestone's follower does
                        log(f"milestone {milestone.name}: {type(err).__name__}: {err}; the trunk trains on")

        last_poll = 0.0
        with StopOnSignals(trainer):
            for line in trainer.lines(timeout=1.0):
                if line:
                    log(line)
                if time.time() - last_poll < POLL_SECONDS and line is not None:
                    continue
                last_poll = time.time()
                follower.poll()
                new_milestones()
        follower.poll()
        if trainer.returncode != 0:
            raise GenesisError(f"trainer exited with {trainer.returncode}; see the log above and {run.events}; "
                               f"rerun to resume from the last checkpoint")
        new_milestones()  # one saved in the very last step
        image = plot(run.root) if plot else None
        if image is not None:
            tracker.client.log_artifact(run_id, str(image))
        status = "FINISHED"
    except Exception:
        status = "FAILED"
        raise
    finally:
        sampler.stop()
        tracker.client.set_terminated(run_id, status)
    latest = run.read_latest()
    return {"run_dir": str(run.root), "step": latest.get("step"), "val_loss": latest.get("val_loss", {}),
            "milestones": [str(path) for path in run.milestones()], "registered": registered, "mlflow_run_id": run_id}
