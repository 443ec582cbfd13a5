"""Tasks that write lineage to MLflow. Retries: a remote tracking server can blip."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from data_prep.sources import CorpusConfig
from genesis.run_dir import BranchDir
from lineage import record
from lineage.registry import Tracker, format_lineage, lineage
from lineage.tracking import recorded_trunks


@task(name="record-data", retries=2, retry_delay_seconds=[5, 30])
def record_data_task(tracker: Tracker, corpus: CorpusConfig, data_dir: str) -> str:
    """The MLflow run of the data directory's corpus, shards and manifest."""
    return record.record_data(tracker, corpus, Path(data_dir))


@task(name="register-milestone", retries=2, retry_delay_seconds=[5, 30], timeout_seconds=3600)
def register_milestone_task(tracker: Tracker, milestone: str | Path, parent_run_id: str | None = None) -> str:
    """The genesis-base version of the milestone's one export (made now if it is not there yet)."""
    return record.record_milestone(tracker, Path(milestone), parent_run_id)


@task(name="register-branch", retries=2, retry_delay_seconds=[5, 30], timeout_seconds=3600)
def register_branch_task(tracker: Tracker, branch_dir: str, base_version: str) -> dict:
    """The genesis-sft and genesis-dpo versions of a complete branch, SFT's parent being `base_version`."""
    return record.record_branch(tracker, BranchDir(branch_dir), base_version)


@task(name="recorded-trunks", retries=2, retry_delay_seconds=[5, 30])
def recorded_trunks_task(tracker: Tracker) -> list[str]:
    """The run directories of the trunks recorded in MLflow that are still on disk."""
    return [run_dir for run_dir in recorded_trunks(tracker) if Path(run_dir).is_dir()]


@task(name="lineage")
def lineage_task(tracker: Tracker) -> str:
    """The tree as registered, drawn as text (and logged)."""
    tree = format_lineage(lineage(tracker))
    get_run_logger().info("lineage:\n" + tree)
    return tree
