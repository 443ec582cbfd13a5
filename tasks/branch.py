"""Branch tasks: export, data, SFT, DPO, eval. Each reads what the previous one left in the branch dir."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from branch.config import BranchConfig
from branch.pipeline import Branch
from tasks import STAGE_CACHE


def _branch(milestone: str, config: BranchConfig, out: str) -> Branch:
    return Branch(Path(milestone), config, Path(out), log=get_run_logger().info)


@task(name="export-milestone", cache_policy=STAGE_CACHE, persist_result=True, timeout_seconds=3600)
def export_task(milestone: str, config: BranchConfig, out: str) -> str:
    return str(_branch(milestone, config, out).export())


@task(name="branch-data", cache_policy=STAGE_CACHE, persist_result=True, timeout_seconds=3 * 3600, retries=2,
      retry_delay_seconds=[30, 120])
def data_task(milestone: str, config: BranchConfig, out: str, base_dir: str) -> dict:
    return _branch(milestone, config, out).data()["totals"]


@task(name="sft", cache_policy=STAGE_CACHE, persist_result=True, timeout_seconds=24 * 3600)
def sft_task(milestone: str, config: BranchConfig, out: str, data_totals: dict) -> str:
    return str(_branch(milestone, config, out).sft())


@task(name="dpo", cache_policy=STAGE_CACHE, persist_result=True, timeout_seconds=24 * 3600)
def dpo_task(milestone: str, config: BranchConfig, out: str, sft_dir: str) -> str:
    return str(_branch(milestone, config, out).dpo())


@task(name="evaluate", cache_policy=STAGE_CACHE, persist_result=True, timeout_seconds=6 * 3600)
def eval_task(milestone: str, config: BranchConfig, out: str, dpo_dir: str) -> dict:
    result = _branch(milestone, config, out).evaluate()
    for stage in ("sft", "dpo"):
        get_run_logger().info(f"{stage}: preference accuracy {result[stage]['preference_accuracy']:.3f}, format "
                              f"{result[stage]['format_adherence']:.2f}, hedging {result[stage]['hedging_score']:.2f}")
    return result
