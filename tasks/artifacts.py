"""What flow runs publish in Prefect's UI (a run's Artifacts tab, and the Artifacts page by key): the trunk's
progress while it trains, each branch's evaluation as a table and its lineage as markdown. Built from what the
stages wrote (latest.json, eval.json, branch.json); the pipeline needs none of it.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from uuid import UUID

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, create_table_artifact, \
    update_progress_artifact

from genesis.run_dir import BranchDir, RunDir
from lineage.registry import BASE, DPO, SFT

PROGRESS_SECONDS = 5.0  # the trunk's progress artifact is refreshed at most this often


def artifact_key(*parts: object) -> str:
    """A key Prefect accepts (lowercase letters, digits, dashes); the same thing gets the same key, so the
    Artifacts page keeps its history."""
    return re.sub(r"[^a-z0-9]+", "-", "-".join(str(part) for part in parts).lower()).strip("-")


class TrunkProgress:
    """A progress artifact at the trunk's step out of the cycle's max_steps, read from latest.json (which the
    trainer rewrites every step): created at the first update, then refreshed at most every PROGRESS_SECONDS."""

    def __init__(self, run_dir: Path, max_steps: int):
        self.run, self.max_steps = RunDir(Path(run_dir)), max_steps
        self.artifact: UUID | None = None
        self.shown: int | None = None
        self.checked = 0.0
        self.failed = False  # an update failed (warned once)

    def update(self, force: bool = False) -> float | None:
        """Refresh the artifact (when due, or `force`) and return its percentage, or None when not refreshed."""
        if not force and time.monotonic() - self.checked < PROGRESS_SECONDS:
            return None
        self.checked = time.monotonic()
        step = int(self.run.read_latest().get("step") or 0)
        if step == self.shown and not force:
            return None
        self.shown = step
        percent = round(min(100.0, 100.0 * step / self.max_steps), 2)
        description = f"trunk {self.run.root}: step {step:,} of {self.max_steps:,}"
        try:
            if self.artifact is None:
                self.artifact = create_progress_artifact(percent, key=artifact_key("trunk", self.run.root.name),
                                                         description=description)
            else:
                update_progress_artifact(self.artifact, percent, description=description)
        except Exception as err:  # noqa: BLE001 - a days-long trunk never stops over its progress display
            if not self.failed:
                get_run_logger().warning(f"trunk progress artifact not updated ({err}); training goes on")
            self.failed = True
            return None
        return percent


def _scalars(scores: dict) -> dict:
    return {key: round(value, 4) if isinstance(value, float) else value for key, value in scores.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)}


def publish_branch(branch: BranchDir, tracking_uri: str, base_version: str, versions: dict) -> dict:
    """A complete branch's evaluation (eval.json) as a table artifact and its lineage (branch.json and the
    registered versions) as a markdown artifact; returns their keys."""
    record, result = branch.read_record(), branch.read_eval()
    run_dir, step = Path(record["run_dir"]), int(record["step"])
    names = {"sft": (SFT, versions["sft"]), "dpo": (DPO, versions["dpo"])}
    rows = [{"stage": stage, "model": f"{name} v{version}", **_scalars(result[stage])}
            for stage, (name, version) in names.items()]
    eval_key = artifact_key("branch", run_dir.name, "step", step, "eval")
    create_table_artifact(rows, key=eval_key, description=(
        f"Evaluation of the branch at step {step:,} of {run_dir}: {result.get('heldout_pairs')} held-out preference "
        f"pairs, {result.get('heldout_prompts')} held-out prompts ({branch.eval_path})"))

    digests = ", ".join(f"{name} `{digest[:12]}`" for name, digest in record.get("data_digests", {}).items())
    markdown = "\n".join([
        f"### Branch at step {step:,} of trunk `{run_dir}`",
        "",
        "| model | version | trained from | directory |",
        "|---|---|---|---|",
        f"| {BASE} | v{base_version} | milestone step {step:,} (`{record['milestone']}`) | `{record['base']}` |",
        f"| {SFT} | v{versions['sft']} | {BASE} v{base_version} | `{branch.sft_dir}` |",
        f"| {DPO} | v{versions['dpo']} | {SFT} v{versions['sft']} | `{branch.dpo_dir}` |",
        "",
        f"Branch directory `{branch.root}`; data digests: {digests or 'none recorded'}.",
        "",
        f"Try it: `MLFLOW_TRACKING_URI={tracking_uri} genesis generate --model models:/{DPO}/{versions['dpo']} "
        f"--chat --prompt 'Why is the sky blue?'`",
    ])
    lineage_key = artifact_key("branch", run_dir.name, "step", step, "lineage")
    create_markdown_artifact(markdown, key=lineage_key,
                             description=f"Lineage of the branch at step {step:,} of {run_dir}")
    return {"eval": eval_key, "lineage": lineage_key}
