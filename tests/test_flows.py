"""Orchestration and lineage: Prefect flows under the test harness, MLflow on a temporary SQLite store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TINY_CORPUS, TINY_CPU, REPO

# eval.max_format_drop=1: a tiny DPO model's format reading is noise, and these tests resolve @latest (a flagged model
# is never @latest: tests/test_format_flag.py)
QUICK_BRANCH = ["sft.max_steps=4", "dpo.max_steps=2", "eval.max_prompts=3", "eval.max_pairs=12", "eval.max_new_tokens=16",
                "eval.max_format_drop=1"]




def task_states(flow_state) -> dict[str, str]:
    """Task name → state name of one flow run (e.g. 'Completed', 'Cached', 'Failed')."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    flow_run_id = flow_state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {run.name.rsplit("-", 1)[0]: run.state.name for run in runs}


def versions(uri: str, name: str) -> list:
    from mlflow import MlflowClient

    try:
        return MlflowClient(tracking_uri=uri, registry_uri=uri).search_model_versions(f"name='{name}'")
    except Exception:  # noqa: BLE001 - the registered model does not exist yet
        return []


def fresh_trunk(trunk: Path, to: Path) -> Path:
    """A copy of a trunk's milestone step 150 (and its metrics) that nothing has exported or registered yet."""
    import shutil

    to.mkdir(parents=True)
    for name in ("config.yaml", "metrics.jsonl"):
        shutil.copy2(trunk / name, to / name)
    shutil.copytree(trunk / "milestones" / "step_00000150", to / "milestones" / "step_00000150")
    return to


def count_calls(monkeypatch, function) -> list:
    """Wrap the real `function` in every loaded module that holds it; the list collects each call's arguments."""
    calls = []

    def counted(*args, **kwargs):
        calls.append(args)
        return function(*args, **kwargs)

    for module in list(sys.modules.values()):
        if getattr(module, "__dict__", {}).get(function.__name__) is function:
            monkeypatch.setattr(module, function.__name__, counted)
    return calls


# ---------------------------------------------------------------------------------------------------------------
# The shape of the orchestration


def test_every_task_reads_every_argument_it_takes_and_knows_when_its_output_is_gone():
    import ast
    import inspect
    import textwrap

    from prefect import Task

    import tasks.branch
    import tasks.data
    import tasks.lineage
    import tasks.trunk
    from tasks import StageTask

    checked = 0
    for module in (tasks.branch, tasks.data, tasks.lineage, tasks.trunk):
        for name, task in vars(module).items():
            if not isinstance(task, Task) or task.fn.__module__ != module.__name__:
                continue
            function = ast.parse(textwrap.dedent(inspect.getsource(task.fn))).body[0]
            parameters = [arg.arg for arg in function.args.args + function.args.kwonlyargs]
            read = {node.id for statement in function.body for node in ast.walk(statement) if isinstance(node, ast.Name)}
            assert [p for p in parameters if p not in read] == [], f"{module.__name__}.{name} ignores an argument"
            if isinstance(task, StageTask):  # its `done` takes what the task takes
                inspect.signature(task.done).bind(**dict.fromkeys(parameters))
            checked += 1
    assert checked >= 12


def test_flows_chain_tasks_and_name_no_file():
    import ast

    for name in ("data", "branches", "pretrain", "tree"):
        tree = ast.parse((REPO / "flows" / f"{name}.py").read_text())
        names = [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)
                 and any(node.value.endswith(suffix) for suffix in (".json", ".jsonl", ".yaml", ".png", ".lock", ".py"))]
        arithmetic = [ast.unparse(node) for node in ast.walk(tree) if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div)]
        assert names == [] and arithmetic == [], (name, names, arithmetic)


# ---------------------------------------------------------------------------------------------------------------
# Data


def test_data_flow_records_the_corpus_and_a_rerun_takes_finished_stages_from_the_cache(harness, tracking, tmp_path):
    from mlflow import MlflowClient

    from flows.data import data_flow

    corpus = tmp_path / "corpus.yaml"
    corpus.write_text(TINY_CORPUS)
    params = {"corpus": str(corpus), "data_dir": str(tmp_path / "data")}
    first = data_flow(**params, return_state=True)
    assert first.is_completed(), first.message
    result = first.result()
    assert result["tokens"] > 100_000 and (tmp_path / "data" / "manifest.json").is_file()

    run = MlflowClient(tracking_uri=tracking).get_run(result["mlflow_run_id"])
    assert run.data.tags["genesis.stage"] == "data" and run.data.metrics["tokens/all"] == result["tokens"]
    assert {d.dataset.name for d in run.inputs.dataset_inputs} == {"prose", "dialog"}
    artifacts = {a.path for a in MlflowClient(tracking_uri=tracking).list_artifacts(run.info.run_id)}
    assert {"report.json", "manifest.json"} <= artifacts

    second = data_flow(**params, return_state=True)
    states = task_states(second)
    assert states["download-clean-dedup"] == states["train-tokenizer"] == states["tokenize-shards"] == "Cached"
    # A stage whose output is gone is recomputed, not trusted to the cache.
    (tmp_path / "data" / "manifest.json").unlink()
    third = data_flow(**params, return_state=True)
    assert task_states(third)["tokenize-shards"] == "Completed" and (tmp_path / "data" / "manifest.json").is_file()


@pytest.mark.slow
def test_the_data_flow_runs_each_job_of_the_stage_as_a_prefect_task_on_a_dask_cluster_and_logs_progress(
        harness, tracking, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId

    from flows.data import data_flow

    corpus = tmp_path / "corpus.yaml"
    corpus.write_text(TINY_CORPUS.replace("executor: serial", "executor: dask").replace("workers: 1", "workers: 2"))
    state = data_flow(corpus=str(corpus), data_dir=str(tmp_path / "data"), return_state=True)
    assert state.is_completed(), state.message
    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    jobs = {}
    for run in runs:
        jobs.setdefault(run.name.rsplit("-", 1)[0], []).append(run.state.name)
    for kind in ("read-clean", "dedup-buckets", "tokenize"):
        assert jobs.get(kind) and set(jobs[kind]) == {"Completed"}, (kind, sorted(jobs))
    messages = [log.message for log in logs]
    assert any(m.startswith("read + clean: ") and "docs" in m and "MB/s" in m for m in messages), messages
    assert any(m.startswith("tokenize: ") for m in messages)


@pytest.mark.slow
def test_a_dask_clusters_chatter_stays_out_of_the_flows_output(harness, tmp_path, capfd):
    # When the stage's cluster closes, a worker's heartbeat can race the scheduler's shutdown, and distributed
    # logs that at ERROR with its traceback ("Failed to communicate with scheduler during heartbeat",
    # CommClosedError): a normal shutdown printed as a failure in the demo's log. A job's own error reaches the
    # task as its exception, so the workers' logging has nothing to add. Logged here the way the worker does.
    import logging

    from prefect import flow

    from data_prep.sources import CorpusConfig
    from tasks.data import PrefectDaskJobs

    corpus = CorpusConfig.model_validate({"name": "chatter", "executor": "dask", "workers": 1, "sources": [
        {"name": "web", "kind": "builtin", "weight": 1.0}]})

    @flow
    def stage_with_a_cluster() -> list:
        jobs = PrefectDaskJobs(corpus)
        try:
            return jobs.map(lambda: logging.getLogger("distributed.worker").exception(
                "Failed to communicate with scheduler during heartbeat."), [()], "closing worker")
        finally:
            jobs.close()

    # Another Dask cluster on the box holds the scheduler's default HTTP port: that is no reason to warn.
    import socket
    import warnings

    with socket.socket() as other_cluster:
        other_cluster.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            other_cluster.bind(("", 8787))
            other_cluster.listen()
        except OSError:
            pass  # something holds it already, which is the case under test
        capfd.readouterr()
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            assert stage_with_a_cluster() == [None]
    printed = "".join(capfd.readouterr())
    assert "Failed to communicate with scheduler" not in printed, printed
    assert not [str(w.message) for w in warned if "already in use" in str(w.message)]
    assert "already in use" not in printed, printed


# ---------------------------------------------------------------------------------------------------------------
# Branches and the registry


def test_branch_flow_registers_nothing_until_eval_then_reuses_the_cache_and_registers_once(
        harness, tracking, tiny_trunk, tmp_path, monkeypatch):
    import genesis_model.hf
    import genesis_model.inference  # noqa: F401 - loaded before counting: it holds verify_checkpoint by name
    from genesis_model.checkpoint import verify_checkpoint
    from flows.branches import branch_flow
    from genesis.run_dir import BranchDir, read_stage

    trunk = fresh_trunk(tiny_trunk, tmp_path / "trunk")
    milestone = trunk / "milestones" / "step_00000150"
    params = {"milestone": str(milestone), "out": str(tmp_path / "branch"), "overrides": QUICK_BRANCH}
    verified, exported = count_calls(monkeypatch, verify_checkpoint), count_calls(monkeypatch, genesis_model.hf.export_hf)

    monkeypatch.setenv("GENESIS_BRANCH_FAIL_STAGE", "eval")
    failed = branch_flow(**params, return_state=True)
    assert failed.is_failed() and "injected failure before the eval stage" in failed.message
    assert versions(tracking, "genesis-sft") == [] and versions(tracking, "genesis-dpo") == []

    monkeypatch.delenv("GENESIS_BRANCH_FAIL_STAGE")
    done = branch_flow(**params, return_state=True)
    assert done.is_completed(), done.message
    states = task_states(done)
    assert [states[t] for t in ("export-milestone", "branch-data", "sft", "dpo")] == ["Cached"] * 4
    assert states["evaluate"] == "Completed"
    result = done.result()
    assert result["versions"] == {"sft": "1", "dpo": "1"} and result["step"] == 150

    # The milestone's weights were read once, after one sha256 pass, into one export (fp32): the registered
    # genesis-base version, SFT's starting point and the evaluation's reference.
    assert len(verified) == 1 and len(exported) == 1
    base = (trunk / "hf" / "step_00000150").resolve()
    branch = BranchDir(tmp_path / "branch")
    assert branch.read_record()["base"] == str(base) and read_stage(branch.sft_dir)["parent"] == str(base)
    assert not (branch.root / "base").exists()
    (registered,) = versions(tracking, "genesis-base")
    import mlflow

    source = Path(mlflow.artifacts.download_artifacts(artifact_uri=registered.source, tracking_uri=tracking))
    assert (source / "MLmodel").is_file()  # an MLflow model (transformers flavor): its model/ folder is the export
    source = source / "model"
    assert (source / "genesis.json").read_text() == (base / "genesis.json").read_text()
    assert json.loads((source / "config.json").read_text())["torch_dtype"] == "float32"

    (sft,), (dpo,), (base,) = versions(tracking, "genesis-sft"), versions(tracking, "genesis-dpo"), versions(tracking, "genesis-base")
    assert sft.tags["parent_model"] == "genesis-base" and sft.tags["parent_version"] == str(base.version)
    assert dpo.tags["parent_model"] == "genesis-sft" and dpo.tags["parent_version"] == str(sft.version)
    assert {"milestone_step", "data_digest", "code_version"} <= set(dpo.tags) and dpo.tags["milestone_step"] == "150"
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking, registry_uri=tracking)
    assert str(client.get_model_version_by_alias("genesis-dpo", "step-150").version) == str(dpo.version)

    # Triggered again (event and watcher both fire): same versions, nothing new.
    again = branch_flow(**params, return_state=True)
    assert again.result()["versions"] == {"sft": "1", "dpo": "1"}
    # While another run holds the branch, this one leaves it alone.
    lock = branch.lock()
    lock.acquire()
    try:
        assert branch_flow(**params).get("skipped")
    finally:
        lock.release()
    assert len(versions(tracking, "genesis-dpo")) == 1
    assert len(verified) == 1 and len(exported) == 1

    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking}
    generated = subprocess.run([sys.executable, "-m", "cli.main", "generate", "--model", "models:/genesis-dpo@latest",
                                "--chat", "--prompt", "Why is the sky blue?", "--max-new-tokens", "8"],
                               capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert generated.returncode == 0, generated.stderr[-2000:]
    tree = subprocess.run([sys.executable, "-m", "cli.main", "lineage"], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=300)
    assert tree.returncode == 0, tree.stderr[-2000:]
    assert "genesis-base v1" in tree.stdout and "genesis-sft v1" in tree.stdout and "genesis-dpo v1" in tree.stdout
    missing = subprocess.run([sys.executable, "-m", "cli.main", "generate", "--model", "models:/genesis-dpo@nope",
                              "--prompt", "x"], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert missing.returncode != 0 and "genesis lineage" in missing.stderr.strip().splitlines()[-1]


def test_bad_flow_input_fails_with_one_clear_line(harness, tracking, tiny_trunk, tmp_path):
    from prefect.exceptions import ParameterBindError

    from flows.branches import branch_flow
    from flows.pretrain import pretrain_flow
    from genesis.run_dir import BranchDir, RunDir

    with pytest.raises(ParameterBindError, match="colour"):
        branch_flow(milestone=str(tmp_path), colour="red", return_state=True)
    negative = pretrain_flow(train_config=str(TINY_CPU), max_steps=0, return_state=True)
    assert negative.is_failed() and "max_steps" in negative.message and "greater than 0" in negative.message

    missing = branch_flow(str(tmp_path / "milestones" / "step_00000010"), return_state=True)
    assert missing.is_failed() and "does not exist" in missing.message and "\n" not in missing.message

    unreachable = branch_flow(str(tiny_trunk / "milestones" / "step_00000150"), tracking_uri="http://127.0.0.1:9",
                              return_state=True)
    assert unreachable.is_failed() and "unreachable" in unreachable.message
    assert not (tiny_trunk / "branches").exists()

    lock = RunDir(tiny_trunk).train_lock()
    lock.acquire()
    try:
        locked = pretrain_flow(train_config=str(TINY_CPU), run_dir=str(tiny_trunk), return_state=True)
    finally:
        lock.release()
    assert locked.is_failed() and "locked" in locked.message


# ---------------------------------------------------------------------------------------------------------------
# The trunk process


def _trainer_processes(marker: str) -> list:
    import psutil

    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if any(marker in part for part in process.info["cmdline"] or []) and "genesis_model.train" in " ".join(process.info["cmdline"]):
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


@pytest.mark.slow
@pytest.mark.parametrize("signal_to_flow", [signal.SIGTERM, signal.SIGKILL])
def test_stopping_a_pretrain_flow_run_leaves_no_trainer_process(tiny_corpus, tmp_path, signal_to_flow):
    run_dir = tmp_path / f"trunk-{signal_to_flow.name}"
    script = (
        "from flows.pretrain import pretrain_flow\n"
        f"pretrain_flow(train_config={str(TINY_CPU)!r}, data_dir={str(tiny_corpus)!r}, "
        f"run_dir={str(run_dir)!r}, max_steps=100000, overrides=['model.vocab_size=2048', 'eval.every=0'])\n")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    # NOTE: its own session, so the ephemeral Prefect server the flow process starts can be cleaned up below
    # (a killed flow process leaves that server orphaned; the trainer is what this test is about).
    flow_process = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not (run_dir / "metrics.jsonl").is_file():
            time.sleep(0.2)
        assert (run_dir / "metrics.jsonl").is_file(), "the trainer never started"
        assert len(_trainer_processes(str(run_dir))) >= 2  # torchrun and its ranks

        flow_process.send_signal(signal_to_flow)  # what a process worker does to a cancelled flow run
        flow_process.wait(timeout=60)
        deadline = time.time() + 60
        while time.time() < deadline and _trainer_processes(str(run_dir)):
            time.sleep(0.2)
        assert _trainer_processes(str(run_dir)) == []
    finally:
        try:
            os.killpg(flow_process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.slow
@pytest.mark.timeout(1800)  # the session's demo may start here
def test_genesis_flow_grows_a_branch_at_each_milestone_while_the_trunk_trains(harness, demo_run, monkeypatch):
    """The session's `genesis demo --quick` is genesis_flow (60 trunk steps, milestones at 30 and 60, a branch at each,
    grown while the trunk trained); a later cycle of the same flow extends that trunk."""
    from mlflow import MlflowClient

    from flows.demo import DEMO_BRANCH_OVERRIDES, QUICK_BRANCH_OVERRIDES, QUICK_TRAIN_OVERRIDES
    from flows.tree import genesis_flow, milestone_watcher

    work, summary = demo_run["work"], demo_run["summary"]
    trunk = work / "demo" / "trunk"
    tracking = f"sqlite:///{work / 'mlflow' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)
    # The trunk is a task of its own in the run graph, the data and each branch subflows.
    assert [stage["flow"] for stage in summary["stages"]] == ["data-flow", "trunk", "branch-flow", "branch-flow"]
    assert [path.name for path in sorted((trunk / "milestones").iterdir())] == ["step_00000030", "step_00000060"]
    assert all((trunk / "branches" / name / "eval.json").is_file() for name in ("step_00000030", "step_00000060"))
    assert len(versions(tracking, "genesis-base")) == 2 and len(versions(tracking, "genesis-dpo")) == 2
    assert "step      30" in demo_run["output"] and "step      60" in demo_run["output"]

    client = MlflowClient(tracking_uri=tracking)
    [pretrain] = client.search_runs([client.get_experiment_by_name("genesis").experiment_id],
                                    filter_string="tags.`genesis.stage` = 'pretrain'")
    assert {"loss", "lr", "val_loss/all", "val_loss/prose", "val_loss/dialog"} <= set(pretrain.data.metrics)
    assert "loss.png" in {a.path for a in client.list_artifacts(pretrain.info.run_id)}
    history = client.get_metric_history(pretrain.info.run_id, "loss")
    assert [m.step for m in history] == list(range(10, 61, 10))
    # Each milestone was cooled off the trunk, which never decayed; its registered validation loss is the cooled
    # model's, not the trunk's at that step.
    assert {m.value for m in client.get_metric_history(pretrain.info.run_id, "lr")} == {3.0e-3}
    for step in (30, 60):
        meta = json.loads((trunk / "milestones" / f"step_{step:08d}" / "meta.json").read_text())
        assert meta["cooldown"]["steps"] == 6 and meta["cooldown"]["from_step"] == step - 6, meta["cooldown"]
        [milestone_run] = client.search_runs([pretrain.info.experiment_id], filter_string=(
            f"tags.`genesis.stage` = 'milestone' and tags.`genesis.milestone_step` = '{step}'"))
        assert milestone_run.data.metrics["val_loss/all"] == pytest.approx(meta["val_loss"]["all"])

    # The watcher finds nothing left to do: every milestone has its branch.
    assert milestone_watcher(run_dirs=[str(trunk)], launch="inline") == []
    # A continued cycle extends the same trunk and adds a milestone; the first two are untouched.
    before = (trunk / "milestones" / "step_00000030" / "COMPLETE.json").read_text()
    extended = genesis_flow(corpus="configs/corpus/builtin.yaml", data_dir=str(work / "demo" / "data"),
                            train_config="configs/train/tiny-demo.yaml", run_dir=str(trunk), nproc=2, max_steps=90,
                            train_overrides=QUICK_TRAIN_OVERRIDES, branch_config="configs/branch/tiny.yaml",
                            branch_overrides=[*DEMO_BRANCH_OVERRIDES, *QUICK_BRANCH_OVERRIDES])
    assert [b["step"] for b in extended["branches"]] == [90]
    assert (trunk / "milestones" / "step_00000030" / "COMPLETE.json").read_text() == before
    assert len(versions(tracking, "genesis-base")) == 3 and len(versions(tracking, "genesis-dpo")) == 3


@pytest.mark.slow
def test_the_trunk_follower_is_plain_python_and_runs_without_prefect(tiny_corpus, tmp_path):
    run_dir = tmp_path / "trunk"
    overrides = [f"data_dir={tiny_corpus}", f"run_dir={run_dir}", "model.vocab_size=2048", "micro_batch_size=4",
                 "max_steps=10", "checkpoint.save_every=10", "checkpoint.milestone_every=10", "eval.every=10",
                 "log_every=5", "optimizer.warmup_steps=2"]
    script = f"""
import importlib.abc, json, sys

class NoPrefect(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "prefect":
            raise ModuleNotFoundError("No module named 'prefect'")

sys.meta_path.insert(0, NoPrefect())
from pathlib import Path
from lineage import follow_trunk
from lineage.registry import connect

lines, reached = [], []
result = follow_trunk(Path({str(TINY_CPU)!r}), {overrides!r}, 1, connect({f"sqlite:///{tmp_path / 'mlflow.db'}"!r}),
                      on_milestone=lambda milestone, version: reached.append([milestone.name, version]), log=lines.append)
print(json.dumps({{"result": result, "reached": reached, "logged": len(lines),
                  "prefect": sorted(m for m in sys.modules if m.split(".")[0] == "prefect")}}))
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["prefect"] == [] and report["logged"] > 0
    assert report["reached"] == [["step_00000010", "1"]]
    assert report["result"]["registered"] == {str(run_dir / "milestones" / "step_00000010"): "1"}
    assert report["result"]["step"] == 10 and "all" in report["result"]["val_loss"]
