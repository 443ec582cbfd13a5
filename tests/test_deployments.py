"""The real thing: `prefect server start`, `prefect deploy --all` from the repository's prefect.yaml, a process
worker, and deployment runs to completion through the API. The deploying shell and the worker have a bare
environment (PATH and a fresh HOME whose Prefect profile names the server): nothing Genesis-specific is set."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO, TINY_CORPUS

from genesis_model.launch import free_port

RETRY_CODES, RETRIES = (429, 502, 503), 5  # Prefect's client defaults (PREFECT_CLIENT_MAX_RETRIES)
QUICK_BRANCH = ["sft.max_steps=3", "dpo.max_steps=2", "eval.max_prompts=2", "eval.max_pairs=8", "eval.max_new_tokens=12"]


def _stop(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=10)  # a worker past this is killed: nothing of it is needed after the test
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(process.pid, signal.SIGKILL)


class Server:
    """A Prefect server on a free port, read and driven over its REST API."""

    def __init__(self, root: Path):
        self.port = free_port()
        self.api = f"http://127.0.0.1:{self.port}/api"
        env = {**os.environ, "PREFECT_HOME": str(root / "server"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        env.pop("PREFECT_API_URL", None)
        self.process = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                         "--port", str(self.port)], cwd=root, env=env, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"{self.api}/health", timeout=2)
                return
            except OSError:
                time.sleep(0.25)
        _stop(self.process)
        pytest.fail("prefect server did not start")

    def call(self, method: str, path: str, body: dict | None = None):
        """One API call, retried on 429/502/503 as Prefect's own client does: the server answers 503 when its
        SQLite database is busy (the worker, the trunk's events and the branch runs write to it at once)."""
        for attempt in range(RETRIES + 1):
            request = urllib.request.Request(f"{self.api}{path}", method=method,
                                             data=None if body is None else json.dumps(body).encode(),
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    return json.loads(response.read() or b"null")
            except urllib.error.HTTPError as err:
                if err.code not in RETRY_CODES or attempt == RETRIES:
                    raise
                retry_after = err.headers.get("Retry-After")
                time.sleep(float(retry_after) if retry_after and retry_after.isdigit() else 2 ** attempt)

    def deployment(self, name: str) -> dict:
        return self.call("GET", f"/deployments/name/{name}")

    def run(self, name: str, parameters: dict, timeout: float) -> dict:
        """Start a run of deployment `name` and wait for a final state; returns the flow run."""
        flow_run = self.call("POST", f"/deployments/{self.deployment(name)['id']}/create_flow_run",
                             {"parameters": parameters})
        deadline = time.time() + timeout
        while time.time() < deadline:
            flow_run = self.call("GET", f"/flow_runs/{flow_run['id']}")
            if flow_run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                return flow_run
            time.sleep(0.5)  # a final state is seen soon after it is reached (the server takes this easily)
        return flow_run

    def wait(self, flow_run_id: str, timeout: float) -> dict:
        """The flow run once in a final state (or as it is at the timeout)."""
        deadline = time.time() + timeout
        while True:
            flow_run = self.call("GET", f"/flow_runs/{flow_run_id}")
            if flow_run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") or time.time() > deadline:
                return flow_run
            time.sleep(0.5)

    def flow_runs(self, deployment: str) -> list[dict]:
        return self.call("POST", "/flow_runs/filter",
                         {"deployments": {"id": {"any_": [self.deployment(deployment)["id"]]}}, "sort": "START_TIME_ASC"})

    def logs(self, flow_run_id: str) -> str:
        logs = self.call("POST", "/logs/filter", {"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 200})
        return "\n".join(log["message"] for log in logs)


def bare_env(home: Path, api: str) -> dict:
    """PATH and a HOME whose Prefect profile names the server, as a person's shell would have after
    `prefect config set PREFECT_API_URL=...`: no GENESIS_REPO, no MLFLOW_TRACKING_URI, nothing else."""
    home.mkdir(parents=True, exist_ok=True)
    env = {"PATH": os.environ["PATH"], "HOME": str(home)}
    configured = subprocess.run([sys.executable, "-m", "prefect", "config", "set", f"PREFECT_API_URL={api}"],
                                cwd=home, env=env, capture_output=True, text=True, timeout=120)
    assert configured.returncode == 0, configured.stderr[-2000:]
    return env


# NOTE: session-scoped: under pytest-xdist a worker runs other modules' tests between these, and a module-scoped
# server and worker were started again after each (a worker that runs none of these starts none).
@pytest.fixture(scope="session")
def deployed(tmp_path_factory):
    """A server with `prefect deploy --all` done from this checkout and a process worker on genesis-process,
    the deploying shell and the worker both with a bare environment."""
    root = tmp_path_factory.mktemp("prefect")
    server = Server(root)
    worker = None
    try:
        env = bare_env(root / "home", server.api)
        for command in ([sys.executable, "deployments/bootstrap.py"], [sys.executable, "-m", "prefect", "--no-prompt",
                                                                        "deploy", "--all"]):
            done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        server.worker_log = root / "worker.log"
        # A worker that polls every 2 s (Prefect's default: 10 s), so a triggered branch starts soon after its event.
        worker = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", "genesis-process"],
                                  cwd=root / "home", env={**env, "PREFECT_WORKER_QUERY_SECONDS": "2"}, stdout=open(server.worker_log, "w"),
                                  stderr=subprocess.STDOUT, start_new_session=True)
        yield server
    finally:
        if worker is not None:
            _stop(worker)
        _stop(server.process)


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
def test_a_deployed_data_flow_runs_on_a_process_worker_with_a_bare_environment(deployed, tmp_path):
    from mlflow import MlflowClient

    for name in ("pretrain-flow/pretrain", "branch-flow/branch", "genesis-flow/genesis",
                 "milestone-watcher/milestone-watcher"):
        assert deployed.deployment(name)["work_pool_name"] == "genesis-process"
    # The milestone trigger starts branch-flow/branch with parameters its form has.
    automations = deployed.call("POST", "/automations/filter", {})
    (action,) = [a for automation in automations for a in automation["actions"] if a["type"] == "run-deployment"]
    assert action["parameters"] == {"milestone": "{{ event.payload.milestone }}",
                                    "tracking_uri": "{{ event.payload.tracking_uri }}"}
    assert "milestone" in deployed.deployment("branch-flow/branch")["parameter_openapi_schema"]["properties"]
    data = deployed.deployment("data-flow/data")
    fields = data["parameter_openapi_schema"]["properties"]  # the run form: typed fields, defaults, descriptions
    assert set(fields) == {"corpus", "data_dir", "overrides", "tracking_uri"}
    assert fields["corpus"]["type"] == "string" and fields["corpus"]["default"] == "configs/corpus/builtin.yaml"
    assert all(spec.get("description") for spec in fields.values()), fields
    assert data["pull_steps"] == [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]

    corpus = tmp_path / "corpus.yaml"
    corpus.write_text(TINY_CORPUS)
    tracking = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    run = deployed.run("data-flow/data", {"corpus": str(corpus), "data_dir": str(tmp_path / "data"),
                                          "tracking_uri": tracking}, timeout=240)
    assert run["state"]["type"] == "COMPLETED", (run["state"], deployed.logs(run["id"])[-3000:],
                                                 deployed.worker_log.read_text()[-3000:])
    assert (tmp_path / "data" / "manifest.json").is_file()
    client = MlflowClient(tracking_uri=tracking)
    recorded = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.`genesis.stage` = 'data'")
    assert len(recorded) == 1


@pytest.mark.slow
@pytest.mark.integration
def test_a_deployed_branch_flow_runs_on_a_process_worker_and_lands_in_mlflow(deployed, tiny_trunk, tmp_path):
    from mlflow import MlflowClient

    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parameters = {"milestone": str(tiny_trunk / "milestones" / "step_00000150"), "out": str(tmp_path / "branch"),
                  "overrides": QUICK_BRANCH, "tracking_uri": tracking}
    run = deployed.run("branch-flow/branch", parameters, timeout=600)
    assert run["state"]["type"] == "COMPLETED", (run["state"], deployed.logs(run["id"])[-3000:],
                                                 deployed.worker_log.read_text()[-3000:])

    client = MlflowClient(tracking_uri=tracking, registry_uri=tracking)
    (dpo,) = client.search_model_versions("name='genesis-dpo'")
    assert dpo.tags["milestone_step"] == "150"
    assert (tmp_path / "branch" / "eval.json").is_file()


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(900)
def test_a_milestone_branches_itself_on_its_pool_while_the_trunk_trains_and_the_watcher_fills_gaps_once(
        deployed, tiny_corpus, tmp_path):
    """#25.3 end to end on a real server: a deployed trunk reaches a milestone → its genesis.milestone.completed event
    fires the deployed trigger → branch-flow runs on the pool the trunk's config names, while the trunk trains on →
    SFT and DPO registered with the milestone as parent. The deployed watcher, run once, launches a branch for a
    milestone that has none (a second trunk, on its trunk's pool) and leaves the one that has (growing or done);
    run again, it launches nothing (the branch it launched is waiting for the worker or growing)."""
    import shutil

    from mlflow import MlflowClient

    from genesis.run_dir import BranchDir

    trunk, other = tmp_path / "trunk", tmp_path / "other-trunk"
    milestone, other_milestone = (path / "milestones" / "step_00000100" for path in (trunk, other))
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # One milestone, at 100; then 99 steps more (≈ 40 s alone, more beside the branch), in which the branch starts
    # (≈ 25 s after the step: registration, event, trigger, the worker's poll, the flow run's process).
    overrides = ["model.vocab_size=2048", "micro_batch_size=4", "log_every=10", "checkpoint.save_every=100",
                 "checkpoint.milestone_every=100", "eval.every=100", "optimizer.warmup_steps=2",
                 f"branches.overrides={json.dumps(QUICK_BRANCH)}"]
    pretrain = deployed.call("POST", f"/deployments/{deployed.deployment('pretrain-flow/pretrain')['id']}/create_flow_run",
                             {"parameters": {"train_config": str(REPO / "configs" / "train" / "tiny-cpu.yaml"),
                                             "data_dir": str(tiny_corpus), "run_dir": str(trunk), "max_steps": 199,
                                             "nproc": 1, "overrides": overrides, "tracking_uri": tracking}})
    deadline = time.time() + 600
    while not BranchDir(trunk / "branches" / "step_00000100").growing and time.time() < deadline:
        assert deployed.call("GET", f"/flow_runs/{pretrain['id']}")["state"]["type"] != "FAILED", \
            deployed.logs(pretrain["id"])[-3000:]
        if BranchDir(trunk / "branches" / "step_00000100").complete:
            break
        time.sleep(1)
    def branch_runs() -> list[dict]:  # this test's own (the module's server also ran other tests' branch runs)
        ours = {str(milestone), str(other_milestone)}
        return [run for run in deployed.flow_runs("branch-flow/branch") if run["parameters"].get("milestone") in ours]

    (triggered,) = branch_runs()
    assert triggered["parameters"] == {"milestone": str(milestone), "tracking_uri": tracking}
    assert triggered["work_pool_name"] == "genesis-process"

    # A second trunk whose milestone has no branch; the watcher looks at both.
    other.mkdir()
    shutil.copy2(trunk / "config.yaml", other / "config.yaml")
    shutil.copytree(milestone, other_milestone)
    watcher = deployed.run("milestone-watcher/milestone-watcher",
                           {"run_dirs": [str(trunk), str(other)], "tracking_uri": tracking}, timeout=300)
    assert watcher["state"]["type"] == "COMPLETED", deployed.logs(watcher["id"])[-3000:]
    deadline = time.time() + 30  # a flow run's last log lines reach the API shortly after its final state
    while f"launched a branch for {other_milestone}" not in deployed.logs(watcher["id"]) and time.time() < deadline:
        time.sleep(1)
    assert f"launched a branch for {other_milestone}" in deployed.logs(watcher["id"]), deployed.logs(watcher["id"])
    assert f"launched a branch for {milestone}" not in deployed.logs(watcher["id"])
    runs = branch_runs()
    assert sorted(run["parameters"]["milestone"] for run in runs) == sorted([str(milestone), str(other_milestone)])
    # Run again at once (the next tick, while that branch run waits for the worker or grows): nothing new.
    again = deployed.run("milestone-watcher/milestone-watcher",
                         {"run_dirs": [str(trunk), str(other)], "tracking_uri": tracking}, timeout=300)
    assert again["state"]["type"] == "COMPLETED", deployed.logs(again["id"])[-3000:]
    assert len(branch_runs()) == 2, deployed.logs(again["id"])

    pretrain = deployed.wait(pretrain["id"], timeout=600)
    branches = [deployed.wait(run["id"], timeout=600) for run in runs]
    for run in (pretrain, *branches):
        assert run["state"]["type"] == "COMPLETED", (run["name"], run["state"], deployed.logs(run["id"])[-3000:],
                                                     deployed.worker_log.read_text()[-3000:])
    triggered = next(run for run in branches if run["id"] == triggered["id"])
    assert triggered["start_time"] < pretrain["end_time"], (triggered["start_time"], pretrain["end_time"])  # overlap

    client = MlflowClient(tracking_uri=tracking, registry_uri=tracking)
    for path in (milestone, other_milestone):
        (base,) = client.search_model_versions(f"name='genesis-base' and tag.milestone_path='{path}'")
        (sft,) = [v for v in client.search_model_versions("name='genesis-sft'") if v.tags["parent_version"] == str(base.version)]
        (dpo,) = [v for v in client.search_model_versions("name='genesis-dpo'") if v.tags["parent_version"] == str(sft.version)]
        assert dpo.tags["milestone_step"] == "100" and BranchDir(path.parent.parent / "branches" / path.name).complete
    assert len(client.search_model_versions("name='genesis-dpo'")) == 2  # each milestone branched once
