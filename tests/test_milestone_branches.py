"""Milestone branches grow with the recipe and on the work pool their trunk's config names (#25.3): the milestone
event carries the trunk and its branch plan, the deployed trigger answers only events for its pool, the watcher
launches on each trunk's pool, a branch beside the trunk never stops the trunk's log or the trunk, and a branch
is one process (one GPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, TINY_CPU


def fake_milestone(run_dir: Path, step: int, branches: dict | None) -> Path:
    """A complete milestone's directory as far as the orchestration reads it: meta.json with the trunk's config."""
    milestone = run_dir / "milestones" / f"step_{step:08d}"
    milestone.mkdir(parents=True)
    config = {"run_dir": str(run_dir), "data_dir": str(run_dir / "data"), "max_steps": step}
    if branches is not None:
        config["branches"] = branches
    (milestone / "meta.json").write_text(json.dumps({"step": step, "config": config}))
    (milestone / "COMPLETE.json").write_text("{}")
    return milestone


def test_the_milestone_event_carries_the_trunk_and_the_recipe_and_pool_its_config_names(tmp_path):
    from flows.params import milestone_recipe
    from genesis.errors import ConfigError
    from tasks.trunk import BRANCH_POOL_LABEL, MILESTONE_EVENT, milestone_event

    run_dir = tmp_path / "genesis-1b"
    milestone = fake_milestone(run_dir, 20000, {"recipe": "configs/branch/genesis-1b.yaml", "work_pool": "gpu-b",
                                                "overrides": ["sft.epochs=1"]})
    event = milestone_event(milestone, "sqlite:////trunk/mlflow.db")
    assert event["event"] == MILESTONE_EVENT
    assert event["resource"][BRANCH_POOL_LABEL] == "gpu-b"
    assert event["payload"] == {
        "milestone": str(milestone), "step": 20000, "run_dir": str(run_dir), "train_config": str(run_dir / "config.yaml"),
        "branch_config": str(REPO / "configs" / "branch" / "genesis-1b.yaml"), "branch_overrides": ["sft.epochs=1"],
        "work_pool": "gpu-b", "tracking_uri": "sqlite:////trunk/mlflow.db"}
    # What the trigger starts (the milestone alone) grows with that recipe, not the tiny CPU one.
    recipe = milestone_recipe(str(milestone))
    assert recipe.name == "genesis-1b" and recipe.device == "cuda" and recipe.sft.epochs == 1
    assert milestone_recipe(str(milestone), "configs/branch/tiny.yaml").name == "tiny"  # a person's choice wins

    # A trunk whose config names no recipe: no pool answers its event, and its branch says what to set.
    bare = fake_milestone(tmp_path / "bare", 10, None)
    assert milestone_event(bare)["resource"][BRANCH_POOL_LABEL] == ""
    with pytest.raises(ConfigError, match="branches.recipe"):
        milestone_recipe(str(bare))


def test_no_branch_path_defaults_to_the_cpu_demo():
    import inspect

    import flows.params
    from flows.branches import branch_flow
    from flows.tree import genesis_flow, milestone_watcher
    from genesis.config import TrainConfig, load_config

    assert not hasattr(flows.params, "BRANCH_CONFIG") and not hasattr(flows.params, "TRUNKS")
    assert inspect.signature(branch_flow.fn).parameters["branch_config"].default is None
    assert inspect.signature(genesis_flow.fn).parameters["branch_config"].default is None
    watcher = inspect.signature(milestone_watcher.fn).parameters
    assert watcher["run_dirs"].default == () and "branch_config" not in watcher and watcher["deployment"].default is None

    # Every training config names its branch recipe; the GPU trunks a GPU recipe on a pool of GPU workers.
    for path in sorted((REPO / "configs" / "train").glob("*.yaml")):
        plan = load_config(TrainConfig, path).branches
        assert plan.recipe is not None and (REPO / plan.recipe).is_file(), path
        if "genesis-1b" in path.name:
            assert plan.recipe.name == "genesis-1b.yaml" and plan.work_pool != "genesis-process", path

    # The deployed trigger answers only events for its own pool and passes the milestone and the trunk's store.
    deployments = {d["name"]: d for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]}
    (trigger,) = deployments["branch"]["triggers"]
    assert trigger["match"]["genesis.branch.work-pool"] == deployments["branch"]["work_pool"]["name"]
    assert trigger["parameters"] == {"milestone": "{{ event.payload.milestone }}",
                                     "tracking_uri": "{{ event.payload.tracking_uri }}"}
    assert "parameters" not in deployments["milestone-watcher"]


@pytest.mark.slow
def test_a_failing_branch_beside_the_trunk_leaves_the_trunk_training_and_its_log_flowing(
        harness, tracking, tiny_corpus, tmp_path, monkeypatch):
    """genesis_flow with a branch that fails: the trunk trains to its last step, its log lines keep arriving in
    Prefect while the branch runs, and the flow run fails only after the trunk, naming the branch."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    import flows.tree
    from genesis.run_dir import RunDir

    monkeypatch.setattr(flows.tree, "data_flow", lambda *args, **kwargs: {"data_dir": str(tiny_corpus)})
    monkeypatch.setenv("GENESIS_BRANCH_FAIL_STAGE", "dpo")  # after the export, the data and SFT: a branch that fails
    run_dir = tmp_path / "trunk"
    # One milestone, at 40, then 39 steps (≈ 25 s on one core) beside its registration and the failing branch.
    state = flows.tree.genesis_flow(
        data_dir=str(tiny_corpus), train_config=str(TINY_CPU), run_dir=str(run_dir), max_steps=79, nproc=1,
        train_overrides=["model.vocab_size=2048", "micro_batch_size=16", "log_every=1", "checkpoint.save_every=40",
                         "checkpoint.milestone_every=40", "eval.every=40", "optimizer.warmup_steps=2"],
        branch_overrides=["sft.max_steps=3"], return_state=True)
    assert state.is_failed(), state
    assert "the trunk trained to step 79, but branch step_00000040 (" in state.message, state.message
    assert "injected failure before the dpo stage" in state.message
    assert RunDir(run_dir).read_latest()["step"] == 79

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs()
        branches = [r for r in runs if r.name == "branch step_00000040"]
        assert len(branches) == 1 and branches[0].state.is_failed(), branches
        branch = branches[0]
        assert branch.parent_task_run_id is not None  # a subflow of the genesis-flow run
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id])))
        branch_logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[branch.id])))
    assert branch_logs and not [log.message for log in branch_logs if "worker thread" in log.message]
    started, ended = branch.start_time, branch.end_time
    during = [log for log in logs if started < log.timestamp < ended and log.message.startswith("step ")]
    steps = [(log.timestamp.isoformat(), log.message[:20]) for log in logs if log.message.startswith("step ")]
    assert during, ("no trainer line reached the trunk's log while the branch ran", started, ended, steps)


def test_a_branch_is_one_process_so_a_multi_process_launch_is_refused_on_every_rank_before_any_work(tmp_path):
    """What `accelerate launch … genesis branch` starts: one process per GPU with RANK/WORLD_SIZE set. Every rank says
    the same one line and leaves the branch directory unmade (no rank takes the lock and dies on it)."""
    milestone = fake_milestone(tmp_path / "trunk", 10, None)
    out = tmp_path / "branch"
    command = [sys.executable, "-m", "cli.main", "branch", "--milestone", str(milestone), "--config",
               "configs/branch/tiny.yaml", "--out", str(out)]
    ranks = [subprocess.Popen(command, cwd=REPO, env={**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank),
                                                      "WORLD_SIZE": "2"}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    for rank, process in enumerate(ranks):
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 2, stderr[-2000:]
        assert stderr.strip().splitlines() == [
            f"error: rank {rank} of 2: a branch runs as one process on one GPU, not under accelerate launch or "
            f"torchrun; run `genesis branch` (or branch-flow) plainly, with CUDA_VISIBLE_DEVICES naming the one GPU"]
    assert not out.exists()
    assert not (REPO / "deployments" / "accelerate").exists()  # no launch recipe for what is refused
