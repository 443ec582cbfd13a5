"""pretrain_flow: the trunk. One task (tasks/trunk.py) launches `torchrun -m genesis_model.train`, streams its
log into Prefect, keeps a progress artifact at its step, follows metrics.jsonl into MLflow, and at each complete
milestone registers it and emits an event (which triggers the branch deployment).

Cancelling the flow run stops the trainer's whole process group (see genesis_model/launch.py). Rerunning resumes
from the last checkpoint; a higher `max_steps` continues the same trunk and adds milestones.
"""

from __future__ import annotations

from prefect import flow

from flows.params import TRAIN_CONFIG, Overrides, Processes, Steps, absolute, trainer_overrides
from lineage.registry import connect
from tasks.trunk import trunk_task


@flow(name="pretrain-flow", log_prints=False)
def pretrain_flow(train_config: str = TRAIN_CONFIG, data_dir: str | None = None, run_dir: str | None = None,
                  max_steps: Steps | None = None, nproc: Processes = 2, overrides: Overrides = (),
                  tracking_uri: str | None = None) -> dict:
    """The trunk trained to max_steps: milestones registered in MLflow as they land, each announced by an event.

    Args:
        train_config: training config, configs/train/*.yaml (relative to the repository, or absolute)
        data_dir: token shards to train on (a data-flow's data_dir); empty: the config's data_dir
        run_dir: the trunk's directory; empty: the config's run_dir
        max_steps: the step this cycle trains to; raise it to continue the trunk (milestones made are kept);
            empty: the config's max_steps
        nproc: trainer processes on this machine (torchrun ranks; the number of GPUs)
        overrides: dotted.key=value overrides of the training config, e.g. micro_batch_size=8
        tracking_uri: MLflow tracking URI; if empty, $MLFLOW_TRACKING_URI, else SQLite in $GENESIS_HOME
            (default runs/mlflow/ in the repository)
    """
    tracker = connect(tracking_uri)  # fail before any work if lineage cannot be recorded
    return trunk_task(absolute(train_config),
                      trainer_overrides(overrides, data_dir=data_dir, run_dir=run_dir, max_steps=max_steps),
                      nproc, tracker)
