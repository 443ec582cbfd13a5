"""Tasks that write lineage to MLflow. Retries: a remote tracking server can blip."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from lineage import record as lineage
from lineage.registry import Tracker


@task(name="record-data", retries=2, retry_delay_seconds=[5, 30])
def record_data_task(tracker: Tracker, corpus, data_dir: str) -> str:
    return lineage.record_data(tracker, corpus, Path(data_dir))


@task(name="register-milestone", retries=2, retry_delay_seconds=[5, 30], timeout_seconds=3600)
def register_milestone_task(tracker: Tracker, milestone: str, parent_run_id: str | None = None) -> str:
    return lineage.record_milestone(tracker, Path(milestone), parent_run_id)


@task(name="register-branch", retries=2, retry_delay_seconds=[5, 30], timeout_seconds=3600)
def register_branch_task(tracker: Tracker, branch, base_version: str) -> dict:
    return lineage.record_branch(tracker, branch, base_version)
