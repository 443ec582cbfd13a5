"""Lineage in MLflow as its users meet it: registered versions MLflow itself loads (mlflow.pyfunc, mlflow.transformers,
`mlflow models serve`), runs nested as the tree grows and spanning the work they record, datasets as inputs of the
runs that read them, versions whose descriptions link their parent and run, a model-training experiment, and the
aliases step-N, latest and champion (moved by `genesis promote`, shown by `genesis lineage`)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import REPO, TINY_CORPUS, TINY_CPU

SYSTEM = "You are Genesis, a curious assistant."
CHAT = {"messages": [{"role": "user", "content": "Why is the sky blue?"}], "max_tokens": 6}
# eval.max_format_drop=1: a tiny DPO model's format reading is noise, and these tests check @latest and @champion (a
# flagged model gets neither: tests/test_format_flag.py)
QUICK_BRANCH = ["sft.max_steps=4", "dpo.max_steps=2", "sft.logging_steps=1", "dpo.logging_steps=1", "eval.max_prompts=3",
                "eval.max_pairs=12", "eval.max_new_tokens=16", "eval.max_format_drop=1"]


def tiny_chat_model(tokenizer_dir: Path, root: Path) -> Path:
    """An SFT directory as the branch's own writer leaves it (branch.training._finish), of a random tiny model."""
    import torch
    from transformers import AutoModelForCausalLM

    from branch.training import _finish, _tokenizer
    from genesis.config import ModelConfig
    from genesis_model.hf import export_hf
    from genesis_model.model import Transformer

    model = Transformer(ModelConfig(vocab_size=2048, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128,
                                    max_seq_len=128))
    model.init_weights(seed=3)
    base = export_hf(model, root / "base", tokenizer_dir=tokenizer_dir, dtype=torch.float32)
    hf = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    trainer = SimpleNamespace(model=hf, state=SimpleNamespace(log_history=[{"loss": 1.0, "step": 1}], global_step=1),
                              save_model=lambda path: hf.save_pretrained(path))
    return _finish(trainer, _tokenizer(base), root / "sft.tmp", root / "sft", "sft", base, 1, SYSTEM)


def reply_of(prediction) -> dict:
    answer = prediction[0] if isinstance(prediction, list) else prediction
    return answer


def test_a_logged_chat_model_is_an_mlflow_model_that_pyfunc_loads_and_chats_with_its_template(tiny_corpus, tmp_path):
    import mlflow

    from lineage.models import log_hf_model
    from lineage.registry import SFT, connect, register_model, resolve_model_uri
    from lineage.tracking import open_run

    model_dir = tiny_chat_model(tiny_corpus / "tokenizer", tmp_path)
    tracker = connect(f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}")
    with open_run(tracker, "sft step 1", {"genesis.stage": "sft"}, system_metrics=False) as run_id:
        model_id = log_hf_model(tracker, run_id, model_dir, "sft", "a tiny chat model")
    version, created = register_model(tracker, SFT, model_id, run_id, {"milestone_step": 1, "milestone_path": "/m"})
    assert created and version == "1"

    uri = f"models:/{SFT}@latest"
    info = mlflow.models.get_model_info(uri)
    assert {"python_function", "transformers"} <= set(info.flavors)
    assert info.flavors["transformers"]["inference_task"] == "llm/v1/chat"
    assert "messages" in info.signature.inputs.input_names() and info.metadata["system_prompt"] == SYSTEM
    chat = mlflow.pyfunc.load_model(uri).predict(CHAT)
    answer = reply_of(chat)
    assert answer["object"] == "chat.completion" and answer["usage"]["completion_tokens"] > 0
    assert isinstance(answer["choices"][0]["message"]["content"], str)
    # The chat template rendered the prompt, the system prompt the model was tuned with included.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    rendered = tokenizer.apply_chat_template(CHAT["messages"], add_generation_prompt=True, return_dict=True)
    assert answer["usage"]["prompt_tokens"] == len(rendered["input_ids"])
    assert SYSTEM in tokenizer.apply_chat_template(CHAT["messages"], add_generation_prompt=True, tokenize=False)

    # Genesis's own loaders get the whole Hugging Face directory (its stage marker included) from the version.
    local = resolve_model_uri(f"models:/{SFT}/1", tracker.uri)
    assert json.loads((local / "genesis_stage.json").read_text())["stage"] == "sft"
    assert (local / "tokenizer.model").is_file() and (local / "model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------------------------
# A whole tree: data, a trunk with two milestones, a branch off the second, registered in one store


@pytest.fixture(scope="module")
def tree(tiny_corpus, tmp_path_factory):
    import yaml

    from branch.config import BranchConfig
    from branch.pipeline import grow
    from data_prep.sources import CorpusConfig
    from genesis.config import load_config, validate
    from genesis.run_dir import BranchDir
    from lineage import follow_trunk
    from lineage.record import record_branch, record_data, record_milestone
    from lineage.registry import connect

    root = tmp_path_factory.mktemp("lineage_mlflow")
    uri = f"sqlite:///{root / 'mlflow' / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
        env.setenv("OMP_NUM_THREADS", "1")
        tracker = connect(uri)
        data_run = record_data(tracker, validate(CorpusConfig, yaml.safe_load(TINY_CORPUS), "tiny"), tiny_corpus)
        run_dir = root / "trunk"
        trunk = follow_trunk(TINY_CPU, [f"data_dir={tiny_corpus}", f"run_dir={run_dir}", "model.vocab_size=2048",
                                        "micro_batch_size=4", "max_steps=4", "checkpoint.save_every=2",
                                        "checkpoint.milestone_every=2", "eval.every=2", "log_every=1",
                                        "optimizer.warmup_steps=1"], 1, tracker, log=lambda line: None)
        milestone = Path(trunk["milestones"][-1])
        base_version = record_milestone(tracker, milestone)
        branch = BranchDir(root / "branch")
        config = load_config(BranchConfig, REPO / "configs" / "branch" / "tiny.yaml", QUICK_BRANCH)
        grow(milestone, config, branch.root, log=lambda line: None)
        versions = record_branch(tracker, branch, base_version)
    return SimpleNamespace(tracker=tracker, uri=uri, data_run=data_run, trunk=trunk, branch=branch,
                           base_version=base_version, versions=versions, client=tracker.client)


def runs_by_stage(tree) -> dict[str, list]:
    found = {}
    for run in tree.client.search_runs([tree.tracker.experiment_id], max_results=100):
        found.setdefault(run.data.tags.get("genesis.stage"), []).append(run)
    return found


def parent_of(run) -> str | None:
    return run.data.tags.get("mlflow.parentRunId")


@pytest.mark.slow
def test_runs_nest_as_the_tree_and_each_spans_the_work_it_records(tree):
    runs = runs_by_stage(tree)
    (pretrain,), (sft,), (dpo,) = runs["pretrain"], runs["sft"], runs["dpo"]
    milestones = {run.data.tags["genesis.milestone_step"]: run for run in runs["milestone"]}
    assert sorted(milestones) == ["2", "4"] and tree.versions == {"sft": "1", "dpo": "1"}
    assert parent_of(pretrain) is None and parent_of(runs["data"][0]) is None
    assert {parent_of(run) for run in milestones.values()} == {pretrain.info.run_id}
    assert parent_of(sft) == milestones["4"].info.run_id and parent_of(dpo) == sft.info.run_id
    assert all(run.info.status == "FINISHED" for stage in runs.values() for run in stage)

    client = tree.client
    for run in (sft, dpo):
        # Open while the stage trained: the trainer's own runtime fits inside the run, and every logged step of
        # its loss landed between the run's start and end (logged live, not replayed afterwards).
        runtime = client.get_metric_history(run.info.run_id, "train/train_runtime")[-1].value
        assert run.info.end_time - run.info.start_time >= 1000 * runtime
        losses = client.get_metric_history(run.info.run_id, "train/loss")
        assert losses and all(run.info.start_time <= m.timestamp <= run.info.end_time for m in losses)
        assert run.data.params["recipe.max_steps"] in ("4", "2")
    for run in (pretrain, sft, dpo):
        assert "system/cpu_utilization_percentage" in run.data.metrics, run.info.run_name
    # The trunk's run spans its training: its first and last logged steps fall inside it.
    loss = client.get_metric_history(pretrain.info.run_id, "loss")
    assert [m.step for m in loss] == [1, 2, 3, 4]
    assert pretrain.info.start_time <= min(m.timestamp for m in loss) <= max(m.timestamp for m in loss) <= pretrain.info.end_time


@pytest.mark.slow
def test_datasets_and_the_manifest_are_inputs_of_the_runs_that_read_them_with_local_sources(tree, tiny_corpus):
    runs = runs_by_stage(tree)

    def inputs(run) -> dict[str, tuple]:
        found = {}
        for item in tree.client.get_run(run.info.run_id).inputs.dataset_inputs:
            context = {tag.key: tag.value for tag in item.tags}.get("mlflow.data.context")
            found[item.dataset.name] = (context, item.dataset.source_type, json.loads(item.dataset.source),
                                        json.loads(item.dataset.profile or "{}"))
        return found

    pretrain = inputs(runs["pretrain"][0])
    assert set(pretrain) == {"manifest", "prose", "dialog"}
    for name, (context, source_type, source, profile) in pretrain.items():
        assert context == "pretraining" and source_type == "local" and source["uri"].startswith("file:///")
        assert Path(source["uri"].removeprefix("file://")).exists()
    assert pretrain["manifest"][2]["uri"] == (tiny_corpus / "manifest.json").resolve().as_uri()
    assert pretrain["prose"][3]["tokens"] > 0 and pretrain["manifest"][3]["shards"] >= 2

    branch_data = tree.branch.data_dir.resolve()
    sft, dpo = inputs(runs["sft"][0]), inputs(runs["dpo"][0])
    assert sft["sft"][:2] == ("training", "local") and sft["sft"][2]["uri"] == (branch_data / "sft.jsonl").as_uri()
    assert dpo["dpo_train"][:2] == ("training", "local") and dpo["dpo_train"][3]["rows"] > 0
    for found in (sft, dpo):
        assert found["dpo_heldout"][0] == found["heldout_prompts"][0] == "evaluation"

    data = inputs(runs["data"][0])
    assert set(data) == {"prose", "dialog"} and all(entry[1] != "http" for entry in data.values())
    assert data["prose"][0] == "corpus" and data["prose"][3]["tokens"] > 0


@pytest.mark.slow
def test_versions_link_their_parent_and_run_and_the_experiment_is_a_training_one(tree):
    client, tracker = tree.client, tree.tracker
    assert client.get_experiment(tracker.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    sft = client.get_model_version("genesis-sft", tree.versions["sft"])
    dpo = client.get_model_version("genesis-dpo", tree.versions["dpo"])
    base = client.get_model_version("genesis-base", tree.base_version)
    assert f"[genesis-sft v{sft.version}](#/models/genesis-sft/versions/{sft.version})" in dpo.description
    assert f"#/experiments/{tracker.experiment_id}/runs/{dpo.run_id}" in dpo.description
    assert f"[genesis-base v{base.version}](#/models/genesis-base/versions/{base.version})" in sft.description
    assert f"runs/{base.run_id}" in base.description and "step 4" in base.description
    # eval.json's format check is on the DPO version (this recipe never flags: eval.max_format_drop=1)
    check = tree.branch.read_eval()["format_check"]
    assert dpo.tags["format_regressed"] == "false" and check["max_drop"] == 1 and not check["flagged"]
    assert float(dpo.tags["format_drop"]) == pytest.approx(check["drop"], abs=1e-4)
    assert "format_regressed" not in sft.tags
    for version in (base, sft, dpo):  # the MLflow model the version's run logged
        assert version.source == f"models:/{client.get_run(version.run_id).data.tags['genesis.model_id']}"
        assert version.source.startswith("models:/m-")
    # The base is a completion model, not a chat one.
    import mlflow

    mlflow.set_tracking_uri(tree.uri)
    completion = mlflow.pyfunc.load_model(f"models:/genesis-base/{base.version}").predict(
        {"prompt": "The sky is", "max_tokens": 4})
    assert reply_of(completion)["object"] == "text_completion"
    chat = mlflow.pyfunc.load_model("models:/genesis-dpo@latest").predict(CHAT)
    assert reply_of(chat)["usage"]["completion_tokens"] > 0
    pipeline = mlflow.transformers.load_model("models:/genesis-dpo@champion")
    assert pipeline.task == "text-generation" and "<|im_start|>" in pipeline.tokenizer.chat_template
    assert pipeline("The sky is", max_new_tokens=3)[0]["generated_text"].startswith("The sky is")


@pytest.mark.slow
def test_step_latest_and_champion_aliases_and_promote_moves_champion(tree, capsys):
    from cli.main import main

    client = tree.client

    def alias(name, alias):
        return str(client.get_model_version_by_alias(name, alias).version)

    assert alias("genesis-base", "step-2") == "1" and alias("genesis-base", "step-4") == "2"
    assert alias("genesis-base", "latest") == "2"
    assert alias("genesis-base", "champion") == "1"  # the first version, until promoted
    assert alias("genesis-dpo", "champion") == tree.versions["dpo"] == alias("genesis-dpo", "step-4")

    assert main(["promote", "base", "step-4", "--tracking-uri", tree.uri]) == 0
    assert "genesis-base@champion moved from v1 to v2" in capsys.readouterr().out
    assert alias("genesis-base", "champion") == "2"
    assert main(["lineage", "--tracking-uri", tree.uri]) == 0
    shown = capsys.readouterr().out
    assert "genesis-base v2  val_loss" in shown and "[champion, latest, step-4]" in shown
    assert "genesis-base  @champion → v2  @latest → v2" in shown
    assert "genesis-dpo   @champion → v1  @latest → v1" in shown

    assert main(["promote", "genesis-dpo", "7", "--tracking-uri", tree.uri]) != 0
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "genesis lineage" in error[0]
    assert main(["promote", "dpo", "1", "--alias", "latest", "--tracking-uri", tree.uri]) != 0
    assert "latest" in capsys.readouterr().err


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_mlflow_models_serve_answers_a_chat_request_from_the_champion(tree, tmp_path):
    port = free_port()
    # As in an activated environment: the scoring server runs `uvicorn` from PATH.
    venv_bin = str(Path(sys.executable).parent)
    env = {**os.environ, "MLFLOW_TRACKING_URI": tree.uri, "OMP_NUM_THREADS": "1",
           "PATH": venv_bin + os.pathsep + os.environ.get("PATH", "")}
    mlflow = Path(venv_bin) / "mlflow"
    server = subprocess.Popen([str(mlflow), "models", "serve", "-m", "models:/genesis-dpo@champion", "--env-manager",
                               "local", "--host", "127.0.0.1", "-p", str(port)], cwd=tmp_path, env=env,
                              stdout=subprocess.DEVNULL, stderr=open(tmp_path / "serve.log", "w"),
                              start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2).read()
                break
            except OSError:
                assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
                time.sleep(0.25)
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(CHAT).encode(),
                                         headers={"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(request, timeout=120).read())
        answer = answer[0] if isinstance(answer, list) else answer
        assert answer["object"] == "chat.completion" and answer["usage"]["completion_tokens"] > 0
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
