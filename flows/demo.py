"""`genesis demo`: the main job on a fresh CPU machine, in minutes, with nothing downloaded.

Runs genesis_flow under one Prefect server of its own (on Prefect's database, so `prefect server start` shows the
runs afterwards) with MLflow on the project's SQLite store: built-in corpus → tokenizer → token shards → tiny model
pretrained on 2 gloo ranks under torchrun, reaching 2 milestones → an SFT + DPO branch at each, grown while the
trunk keeps training → everything registered → the lineage tree, a sample reply from each model, and a summary:
each stage's duration and outputs, then the next commands, each working as printed from the directory the demo ran
in (a registry or Prefect home set through the environment is written into the command).
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path


SAMPLE_PROMPT = "Why do we have seasons?"
DEMO_BRANCH_OVERRIDES = ["sft.epochs=2", "eval.max_prompts=16", "eval.max_new_tokens=100"]
# `genesis demo --quick`: the same tree, smaller (a first look, and the test of every command the demo prints).
QUICK_STEPS = 60
QUICK_TRAIN_OVERRIDES = ["checkpoint.save_every=30", "checkpoint.milestone_every=30", "eval.every=30", "log_every=10",
                         "optimizer.warmup_steps=5"]
QUICK_BRANCH_OVERRIDES = ["sft.max_steps=4", "dpo.max_steps=2", "eval.max_prompts=3", "eval.max_pairs=12",
                          "eval.max_new_tokens=16", "sft.logging_steps=2", "dpo.logging_steps=1"]


def sample_reply(model_dir: Path, prompt: str, chat: bool, max_new_tokens: int = 60) -> str:
    from genesis.chat import EOS, IM_END, IM_START, encode_chat
    from genesis_model.generate import Generator, SamplingConfig
    from genesis_model.inference import load_hf, load_tokenizer

    loaded = load_hf(model_dir)
    tokenizer = load_tokenizer(loaded.tokenizer_dir, str(model_dir))
    if chat:
        ids = encode_chat(tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True)
    else:
        ids = tokenizer.encode(prompt, add_special_tokens=False)
    stop = {tokenizer.convert_tokens_to_ids(t) for t in (IM_END, EOS, IM_START)}
    new = Generator(loaded.model).generate(ids, SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.7, top_k=40,
                                                               seed=0), stop_ids=stop)
    return tokenizer.decode([t for t in new if t not in stop], skip_special_tokens=True).strip()


def unigram_baseline(run_dir: Path) -> float:
    """The unigram cross-entropy on the run's own held-out documents (what the model must clearly beat)."""
    from genesis.config import TrainConfig, load_config
    from genesis.run_dir import RunDir
    from genesis_model.loader import TokenLoader, unigram_cross_entropy

    config = load_config(TrainConfig, RunDir(run_dir).config)
    loader = TokenLoader(config.data_dir, config.window, 1, holdout_docs_per_source=config.eval.holdout_docs_per_source,
                         seed=config.seed)
    return unigram_cross_entropy(loader)


# ---------------------------------------------------------------------------------------------------------------
# One Prefect server for the whole demo


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def prefect_server():
    """One Prefect server for the demo's flows, the data stage's Dask workers included (they inherit its URL;
    left to themselves, each worker started a temporary server of its own). It uses Prefect's database
    ($PREFECT_HOME), so `prefect server start` shows the demo's runs afterwards. Yields the server's UI address."""
    import logging

    from prefect.server.api.server import SubprocessASGIServer

    from genesis.logs import quieted
    from prefect.settings import PREFECT_API_URL, temporary_settings

    server = SubprocessASGIServer(port=_free_port())
    # Prefect's "Starting temporary server ... See https://..." notes: the demo says it itself.
    with quieted("prefect", logging.WARNING):
        server.start(timeout=120)
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            yield server.address
    finally:
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=30, at_exit=False)  # the runs' last log lines, sent before the server goes
        with quieted("prefect", logging.WARNING):
            server.stop()


def stage_times(flow_run_id) -> list[dict]:
    """The flow run's stages as Prefect recorded them: its subflows (data, each branch) and its trunk task, with
    their task runs, each with start and seconds."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId

    def seconds(run) -> float:
        if run.start_time and run.end_time:
            return (run.end_time - run.start_time).total_seconds()
        return run.total_run_time.total_seconds()

    def tasks(client, run_id) -> list[dict]:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
        return [{"name": run.name.rsplit("-", 1)[0], "start": run.start_time, "seconds": seconds(run)}
                for run in runs if run.start_time]

    stages = []
    with get_client(sync_client=True) as client:
        subflows = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])))
        for run in subflows:
            flow = client.read_flow(run.flow_id).name
            stages.append({"flow": flow, "name": run.name, "start": run.start_time, "seconds": seconds(run),
                           "tasks": tasks(client, run.id)})
        for task in tasks(client, flow_run_id):
            if task["name"] == "trunk":
                stages.append({"flow": "trunk", "name": "trunk", **task, "tasks": []})
    return sorted(stages, key=lambda stage: stage["start"])


# ---------------------------------------------------------------------------------------------------------------
# The summary: stages, outputs, next commands


def _program(name: str) -> str:
    """How to run one of this environment's programs from the current directory (.venv/bin/genesis)."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        return name
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _bare_tracking_uri() -> str:
    """The tracking URI a command gets in a plain shell: the project's default store."""
    from lineage.registry import REPO_ROOT

    return f"sqlite:///{(REPO_ROOT / 'runs' / 'mlflow' / 'mlflow.db').resolve()}"


def next_commands(tracking_uri: str, trunk_dir: Path, model: str) -> list[tuple[str, str]]:
    """(command, what it shows): each works pasted into a plain shell in the current directory."""
    genesis = _program("genesis")
    registry = "" if tracking_uri == _bare_tracking_uri() else f" --tracking-uri {shlex.quote(tracking_uri)}"
    prefect_home = f"PREFECT_HOME={shlex.quote(os.environ['PREFECT_HOME'])} " if os.environ.get("PREFECT_HOME") else ""
    return [
        (f"{genesis} lineage{registry}", "the tree from the MLflow registry, with each alias"),
        (f"{genesis} generate --model {model}{registry} --chat --prompt {shlex.quote(SAMPLE_PROMPT)}",
         "a reply from the newest DPO model"),
        (f"{genesis} serve --run-dir {shlex.quote(str(trunk_dir))} --tracking-uri {shlex.quote(tracking_uri)}",
         "then http://127.0.0.1:8765/: status, curves, tree, try-it page"),
        (f"{_program('mlflow')} ui --backend-store-uri {shlex.quote(tracking_uri)}",
         "then http://127.0.0.1:5000: runs, metrics, registered models"),
        (f"{prefect_home}{_program('prefect')} server start", "then http://127.0.0.1:4200: the demo's flow runs"),
    ]


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{int(seconds // 60)} min {seconds % 60:02.0f} s"


def summary_lines(stages: list[dict], result: dict, tree: list[dict], samples_seconds: float, total_seconds: float,
                  tracking_uri: str, commands: list[tuple[str, str]]) -> list[str]:
    trunk = result["trunk"]
    branches = {b["branch_dir"]: b for b in result["branches"] if "versions" in b}
    lines = ["", "=" * 100, f"genesis demo: done in {_duration(total_seconds)}", "",
             f"{'stage':<24}{'took':>12}   outputs"]
    for stage in stages:
        took = _duration(stage["seconds"])
        if stage["flow"] == "data-flow":
            lines.append(f"{'data':<24}{took:>12}   {result['data']['data_dir']}  (manifest.json, tokenizer/, shards)")
        elif stage["flow"] == "trunk":
            lines.append(f"{'trunk (pretrain)':<24}{took:>12}   {trunk['run_dir']}  (step {trunk['step']}; "
                         f"branches grew meanwhile)")
            lines += [f"{'':<39}{milestone}" for milestone in trunk["milestones"]]
        elif stage["flow"] == "branch-flow":
            parts = ", ".join(f"{t['name']} {_duration(t['seconds'])}"
                              for t in sorted(stage["tasks"], key=lambda t: t["start"])
                              if t["name"] in ("sft", "dpo", "evaluate"))
            name = stage["name"].removeprefix("branch ")
            branch = next((b for d, b in branches.items() if Path(d).name == name), None)
            where = f"{branch['branch_dir']}  (sft/, dpo/, eval.json)" if branch else ""
            lines.append(f"{'branch ' + name:<24}{took:>12}   {where}")
            if branch:
                lines.append(f"{'':<39}genesis-sft v{branch['versions']['sft']}, genesis-dpo "
                             f"v{branch['versions']['dpo']}; {parts}")
    lines.append(f"{'sample replies':<24}{_duration(samples_seconds):>12}")
    versions = sum(1 + 2 * len(node["branches"]) for node in tree)
    lines.append(f"{'registry':<24}{'':>12}   {tracking_uri}  ({versions} model versions)")
    lines += ["", f"Next (paste into a shell in {Path.cwd()}):"]
    for command, what in commands:
        lines += [f"  # {what}", f"  {command}"]
    return lines


# ---------------------------------------------------------------------------------------------------------------


def demo(workdir: Path, nproc: int = 2, quick: bool = False) -> dict:
    workdir = workdir.resolve()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no telemetry from the demo's server
    from flows.tree import genesis_flow
    from lineage.registry import BASE, DPO, SFT, connect, lineage, resolve_model_uri

    started = time.time()
    tracker = connect()  # the project's registry (GENESIS_HOME, MLFLOW_TRACKING_URI): where `genesis lineage` looks
    train_overrides = QUICK_TRAIN_OVERRIDES if quick else []
    branch_overrides = [*DEMO_BRANCH_OVERRIDES, *(QUICK_BRANCH_OVERRIDES if quick else [])]
    with prefect_server() as prefect_address:
        print(f"Prefect UI while the demo runs: {prefect_address}", flush=True)
        state = genesis_flow(corpus="configs/corpus/builtin.yaml", data_dir=str(workdir / "data"),
                             train_config="configs/train/tiny-demo.yaml", run_dir=str(workdir / "trunk"), nproc=nproc,
                             max_steps=QUICK_STEPS if quick else None, train_overrides=train_overrides,
                             branch_config="configs/branch/tiny.yaml", branch_overrides=branch_overrides,
                             tracking_uri=tracker.uri, return_state=True)
        result = state.result()  # a failed flow raises its error here
        stages = stage_times(state.state_details.flow_run_id)
    tree = lineage(tracker)

    print("\n" + "=" * 100 + "\nlineage (from MLflow):\n" + result["lineage"], flush=True)
    from branch.training import quiet_libraries

    quiet_libraries()  # no "Loading weights" bars while the samples load each model
    samples_started = time.time()
    samples = {}
    for node in tree:
        for name, version, chat in [(BASE, node["version"], False)] + [
                (kind_name, branch[kind]["version"], True)
                for branch in node["branches"] for kind, kind_name in (("sft", SFT), ("dpo", DPO)) if branch[kind]]:
            uri = f"models:/{name}/{version}"
            prompt = "The sky is blue because" if not chat else SAMPLE_PROMPT
            samples[f"{uri} (step {node['step']})"] = reply = sample_reply(resolve_model_uri(uri), prompt, chat)
            print(f"\n--- {uri}, milestone step {node['step']} ---\n> {prompt}\n{reply}", flush=True)
    samples_seconds = time.time() - samples_started

    trunk = result["trunk"]
    # The newest DPO model by its milestone's alias: @latest skips a version flagged for lost format adherence
    newest = max((node["step"] for node in tree if any(b["dpo"] for b in node["branches"])), default=None)
    commands = next_commands(tracker.uri, Path(trunk["run_dir"]),
                             f"models:/{DPO}@step-{newest}" if newest is not None else f"models:/{DPO}@latest")
    summary = {
        "seconds": round(time.time() - started, 1),
        "val_loss": trunk["val_loss"].get("all"),
        "unigram_val_loss": round(unigram_baseline(Path(trunk["run_dir"])), 4),
        "milestones": len(trunk["milestones"]),
        "branches": sum(len(node["branches"]) for node in tree),
        "samples": samples,
        "branch_eval": [b["eval"] for b in result["branches"] if "eval" in b],
        "stages": [{"stage": s["name"], "flow": s["flow"], "seconds": round(s["seconds"], 1)} for s in stages],
        "tracking_uri": tracker.uri,
        "commands": [command for command, _ in commands],
    }
    print(f"\nvalidation loss {summary['val_loss']:.3f} vs unigram baseline {summary['unigram_val_loss']:.3f} "
          f"nats/token")
    print("\n".join(summary_lines(stages, result, tree, samples_seconds, summary["seconds"], tracker.uri, commands)),
          flush=True)
    return summary


def write_summary(summary: dict, path: Path) -> None:
    path.write_text(json.dumps(summary, indent=2))
