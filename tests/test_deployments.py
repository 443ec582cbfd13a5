"""The real thing: `prefect server start`, a process worker, `prefect deploy --all` from the repository's
prefect.yaml, and a deployment run to completion through the API, checked in MLflow."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO

from genesis_model.launch import free_port

QUICK_BRANCH = ["sft.max_steps=3", "dpo.max_steps=2", "eval.max_prompts=2", "eval.max_pairs=8", "eval.max_new_tokens=12"]


def _prefect(args: list[str], env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prefect", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _stop(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(process.pid, signal.SIGKILL)


def test_every_deployment_entrypoint_loads_as_a_worker_loads_it():
    """A worker runs a flow from its entrypoint file, as a module named after the file, with flows/ first on
    sys.path: a flow file named like a package (flows/branch.py) would stand in for that package there."""
    import yaml

    deployments = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
    assert {d["name"] for d in deployments} == {"data", "pretrain", "branch", "genesis", "milestone-watcher"}
    for deployment in deployments:
        script = ("from prefect.flows import load_flow_from_entrypoint\n"
                  f"flow = load_flow_from_entrypoint({deployment['entrypoint']!r}, use_placeholder_flow=False)\n"
                  "print(flow.name)\n")
        loaded = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert loaded.returncode == 0, (deployment["entrypoint"], loaded.stderr[-2000:])


@pytest.mark.slow
@pytest.mark.integration
def test_a_deployed_branch_flow_runs_on_a_process_worker_and_lands_in_mlflow(tiny_trunk, tmp_path):
    from mlflow import MlflowClient

    port = free_port()
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "GENESIS_REPO": str(REPO), "MLFLOW_TRACKING_URI": tracking,
           "COLUMNS": "250"}  # rich tables: no truncated names
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                               str(port)], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    worker = None
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        else:
            pytest.fail("prefect server did not start")
        bootstrap = subprocess.run([sys.executable, "deployments/bootstrap.py"], cwd=REPO, env=env, capture_output=True,
                                   text=True, timeout=120)
        assert bootstrap.returncode == 0, bootstrap.stderr[-2000:]
        deployed = _prefect(["--no-prompt", "deploy", "--all"], env)
        assert deployed.returncode == 0, deployed.stdout[-2000:] + deployed.stderr[-2000:]
        listed = _prefect(["deployment", "ls"], env)
        for name in ("data-flow/data", "pretrain-flow/pretrain", "branch-flow/branch", "genesis-flow/genesis",
                     "milestone-watcher/milestone-watcher"):
            assert name in listed.stdout, listed.stdout

        worker_log = open(tmp_path / "worker.log", "w")
        worker = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", "genesis-process"],
                                  cwd=REPO, env=env, stdout=worker_log, stderr=subprocess.STDOUT, start_new_session=True)
        parameters = {"params": {"milestone": str(tiny_trunk / "milestones" / "step_00000150"),
                                 "out": str(tmp_path / "branch"), "overrides": QUICK_BRANCH}}
        script = ("import json, sys\nfrom prefect.deployments import run_deployment\n"
                  f"run = run_deployment('branch-flow/branch', parameters={parameters!r}, timeout=600)\n"
                  "print(json.dumps({'state': run.state.type.value, 'message': run.state.message}))\n")
        waited = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                                timeout=700)
        assert waited.returncode == 0, waited.stderr[-2000:]
        state = json.loads(waited.stdout.strip().splitlines()[-1])
        assert state["state"] == "COMPLETED", (state, (tmp_path / "worker.log").read_text()[-3000:])

        client = MlflowClient(tracking_uri=tracking, registry_uri=tracking)
        (dpo,) = client.search_model_versions("name='genesis-dpo'")
        assert dpo.tags["milestone_step"] == "150"
        assert (tmp_path / "branch" / "eval.json").is_file()
    finally:
        if worker is not None:
            _stop(worker)
        _stop(server)
