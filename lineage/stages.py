"""A branch's SFT and DPO runs in MLflow, recorded while they train.

branch/pipeline.py enters a stage recorder around each training stage (train_sft, train_dpo); `connect()` installs
this one, for the store it connected to. For a branch off a milestone registered in that store it opens a run that
spans the training:

    milestone step N  (the genesis-base version's run)
    └── sft step N    recipe params, sft.jsonl as its training input, train/* metrics as TRL logs them, system metrics,
        │             the SFT directory logged as an MLflow model when training ends
        └── dpo step N  the same for DPO, on dpo_train.jsonl

The versions are registered from these runs only once the branch is evaluated (lineage.record.record_branch). A
branch whose milestone is not registered in the store (plain `genesis branch`) trains without a run.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path

from genesis.run_dir import BranchDir
from lineage.models import log_hf_model
from lineage.tracking import BASE, Tracker, find_run, log_dataset, log_metrics, log_params, open_run

# stage → (data file it trains on, the other data files the branch's evaluation reads)
TRAINS_ON = {"sft": "sft", "dpo": "dpo_train"}
EVALUATED_ON = ("dpo_heldout", "heldout_prompts")
COLUMNS = {"sft": {"messages": "string"}, "dpo_train": {"prompt": "string", "chosen": "string", "rejected": "string"},
           "dpo_heldout": {"prompt": "string", "chosen": "string", "rejected": "string"},
           "heldout_prompts": {"messages": "string"}}


def milestone_version(tracker: Tracker, milestone: str):
    """The genesis-base version registered for this milestone path, or None."""
    try:
        versions = tracker.client.search_model_versions(f"name='{BASE}' and tag.milestone_path='{milestone}'")
    except Exception:  # noqa: BLE001 - no genesis-base in this registry yet
        return None
    return min(versions, key=lambda v: int(v.version)) if versions else None


def stage_run(tracker: Tracker, branch: BranchDir, stage: str):
    """The newest finished run of this branch's stage (sft or dpo), or None."""
    return find_run(tracker, "FINISHED", stage=stage, branch_dir=str(Path(branch.root).resolve()))


def stage_parent(tracker: Tracker, branch: BranchDir, stage: str) -> str | None:
    """The run a stage's run nests under: the milestone's run for SFT, the SFT run for DPO (the milestone's if
    SFT has none)."""
    if stage == "dpo":
        sft = stage_run(tracker, branch, "sft")
        if sft is not None:
            return sft.info.run_id
    base = milestone_version(tracker, branch.read_record()["milestone"])
    return base.run_id if base is not None else None


def stage_tags(branch: BranchDir, stage: str) -> dict:
    record = branch.read_record()
    return {"genesis.stage": stage, "genesis.branch_dir": str(Path(branch.root).resolve()),
            "genesis.milestone": record["milestone"], "genesis.milestone_step": str(record["step"])}


def log_stage_inputs(tracker: Tracker, run_id: str, branch: BranchDir, stage: str, evaluation: bool = False) -> None:
    """The stage's recipe as params and the data it reads as inputs: its training file, and with `evaluation` the
    held-out files the branch's evaluation scored it on."""
    record = branch.read_record()
    if not evaluation:
        log_params(tracker, run_id, {"recipe": record["config"][stage], "milestone_step": record["step"],
                                     "base": record.get("base"), "seed": record["config"].get("seed"),
                                     "device": record.get("device")})
    names = EVALUATED_ON if evaluation else (TRAINS_ON[stage],)
    for name in names:
        path = branch.data_file(name)
        rows = sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line)
        log_dataset(tracker, run_id, name, path, record["data_digests"][name],
                    context="evaluation" if evaluation else "training", profile={"rows": rows}, columns=COLUMNS[name])


def stage_description(branch: BranchDir, stage: str) -> str:
    record = branch.read_record()
    parent = "the SFT model of this branch" if stage == "dpo" else f"the trunk's milestone at step {record['step']}"
    return (f"Genesis {stage.upper()} model: {stage.upper()} of {parent}, branch {Path(branch.root).resolve()}.\n\n"
            f"Chat with the template in tokenizer_config.json / chat_template.jinja; its default system prompt is the "
            f"one the model was tuned with.")


class BranchStageRecorder:
    """Opens the MLflow run of an SFT or DPO stage for as long as it trains (see the module's docstring)."""

    def __init__(self, tracker: Tracker):
        self.tracker = tracker

    @contextmanager
    def __call__(self, stage: str, branch: BranchDir):
        tracker = self.tracker
        try:
            parent = stage_parent(tracker, branch, stage)
        except Exception as err:  # noqa: BLE001 - the tracking store is away: train anyway, registration catches up
            warnings.warn(f"{stage} of {branch.root}: not recorded in MLflow ({str(err).splitlines()[0][:160]})",
                          stacklevel=3)
            parent = None
        if parent is None:  # not a branch this store follows
            yield []
            return
        step = branch.read_record()["step"]
        with open_run(tracker, f"{stage} step {step}", stage_tags(branch, stage), parent) as run_id:
            log_stage_inputs(tracker, run_id, branch, stage)
            yield [metrics_callback(tracker, run_id)]
            out = branch.sft_dir if stage == "sft" else branch.dpo_dir
            log_hf_model(tracker, run_id, out, stage, stage_description(branch, stage))


def metrics_callback(tracker: Tracker, run_id: str):
    """A transformers TrainerCallback that logs each of the trainer's logging steps to the run as train/<key>."""
    from transformers import TrainerCallback

    class ToMLflow(TrainerCallback):
        failed = False

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.failed or not logs:
                return
            try:
                log_metrics(tracker, run_id, {k: v for k, v in logs.items() if k != "epoch"}, step=state.global_step,
                            prefix="train/")
            except Exception as err:  # noqa: BLE001 - a tracking blip must not stop training
                self.failed = True
                warnings.warn(f"MLflow run {run_id}: training metrics no longer logged ({err})", stacklevel=2)

    return ToMLflow()
