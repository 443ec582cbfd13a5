"""Branch tasks: base → data → SFT → DPO → eval, each over one stage of branch/pipeline.py.

Each takes the paths it reads (the base model, the branch directory with its data, the models before it) and
returns the paths it wrote; the milestone is read for its weights once, by the export, and for its meta.json by
the data stage, never again.
"""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from branch.config import BranchConfig
from branch.pipeline import build_data, evaluate, export_base, headline, train_dpo, train_sft
from genesis.run_dir import BranchDir, RunDir, is_exported, stage_complete
from lineage.registry import Tracker
from tasks import stage_task
from tasks.artifacts import publish_branch


def _exported(milestone: str) -> bool:
    return is_exported(RunDir.of_checkpoint(Path(milestone)).hf_export(Path(milestone)))


@stage_task(done=lambda milestone: _exported(milestone), name="export-milestone", timeout_seconds=3600)
def export_task(milestone: str) -> str:
    """The milestone, checked, then exported once: the base model (<run_dir>/hf/step_N)."""
    return str(export_base(Path(milestone), log=get_run_logger().info))


@stage_task(done=lambda branch_dir, **_: BranchDir(branch_dir).has_data, name="branch-data",
            timeout_seconds=3 * 3600, retries=2, retry_delay_seconds=[30, 120])
def data_task(milestone: str, base_dir: str, config: BranchConfig, branch_dir: str) -> str:
    """The branch directory, now holding its SFT and DPO data and branch.json."""
    branch = build_data(Path(milestone), Path(base_dir), config, BranchDir(branch_dir), log=get_run_logger().info)
    return str(branch.root)


@stage_task(done=lambda branch_dir, **_: stage_complete(BranchDir(branch_dir).sft_dir), name="sft",
            timeout_seconds=24 * 3600)
def sft_task(base_dir: str, branch_dir: str, config: BranchConfig) -> str:
    """The SFT model trained from the base on the branch's conversations."""
    return str(train_sft(Path(base_dir), BranchDir(branch_dir), config, log=get_run_logger().info))


@stage_task(done=lambda branch_dir, **_: stage_complete(BranchDir(branch_dir).dpo_dir), name="dpo",
            timeout_seconds=24 * 3600)
def dpo_task(sft_dir: str, branch_dir: str, config: BranchConfig) -> str:
    """The DPO model trained from the SFT model on the branch's training pairs."""
    return str(train_dpo(Path(sft_dir), BranchDir(branch_dir), config, log=get_run_logger().info))


@stage_task(done=lambda branch_dir, **_: BranchDir(branch_dir).complete, name="evaluate",
            timeout_seconds=6 * 3600)
def eval_task(base_dir: str, sft_dir: str, dpo_dir: str, branch_dir: str, config: BranchConfig) -> dict:
    """eval.json, which completes the branch; returns its headline numbers and the milestone's step."""
    result = evaluate(Path(base_dir), Path(sft_dir), Path(dpo_dir), BranchDir(branch_dir), config,
                      log=get_run_logger().info)
    scores = headline(result)
    for stage, row in scores.items():
        get_run_logger().info(f"{stage}: preference accuracy {row['preference_accuracy']:.3f}, format "
                              f"{row['format_adherence']:.2f}, hedging {row['hedging_score']:.2f}")
    return {"step": result["milestone"]["step"], **scores}


@task(name="publish-branch", cache_policy=NO_CACHE)
def publish_task(tracker: Tracker, branch_dir: str, base_version: str, versions: dict) -> dict:
    """The registered branch in the run's artifacts: its evaluation as a table, its lineage as markdown (never
    cached: every run that completes the branch shows them). Returns the artifacts' keys."""
    return publish_branch(BranchDir(branch_dir), tracker.uri, base_version, versions)


@task(name="milestones-to-branch")
def milestones_to_branch_task(run_dir: str) -> list[str]:
    """The run's complete milestones whose branch is neither complete nor being grown right now."""
    return [str(milestone) for milestone in RunDir(Path(run_dir)).milestones_to_branch()]
