"""pretrain_flow: the trunk. One task (tasks/trunk.py) launches `torchrun -m genesis_model.train`, streams its
log into Prefect, follows metrics.jsonl into MLflow, and at each complete milestone registers it and emits an
event (which triggers the branch deployment).

Cancelling the flow run stops the trainer's whole process group (see genesis_model/launch.py). Rerunning resumes
from the last checkpoint; a higher `max_steps` continues the same trunk and adds milestones.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from prefect import flow

from flows.params import PretrainParams
from lineage.registry import Tracker, connect
from tasks.trunk import trunk_task


def grow_trunk(params: PretrainParams, tracker: Tracker, on_milestone: Callable[[Path, str], None] | None = None) -> dict:
    """The trunk task for these parameters: pretrain_flow's whole work, and genesis_flow's with a branch per milestone."""
    return trunk_task(params.config_path(), params.train_overrides(), params.nproc, tracker, on_milestone)


@flow(name="pretrain-flow", log_prints=False)
def pretrain_flow(params: PretrainParams = PretrainParams(), tracking_uri: str | None = None) -> dict:
    return grow_trunk(params, connect(tracking_uri))
