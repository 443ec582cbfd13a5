"""What a person sees in Prefect's UI: each deployment's run form (typed fields with defaults and descriptions),
the trunk as a task with a progress artifact while it trains, and each branch's evaluation table and lineage."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, TINY_CPU

QUICK_BRANCH = ["sft.max_steps=3", "dpo.max_steps=2", "eval.max_prompts=2", "eval.max_pairs=8", "eval.max_new_tokens=12"]




def flow_run_artifacts(state) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))


def task_names(state) -> dict[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    return {run.name.rsplit("-", 1)[0]: run.state.name for run in runs}


def test_every_deployment_parameter_is_a_typed_field_with_a_default_and_a_description():
    """The schema `prefect deploy` stores for each deployment (parameter_schema of the flow as a worker loads it),
    which the UI's run form renders: one typed field per parameter, none a nested object."""
    import yaml

    entrypoints = {d["name"]: d["entrypoint"] for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]}
    script = ("import json\nfrom prefect.flows import load_flow_from_entrypoint\n"
              "from prefect.utilities.callables import parameter_schema\n"
              f"print(json.dumps({{name: parameter_schema(load_flow_from_entrypoint(entrypoint)).model_dump_for_openapi()"
              f" for name, entrypoint in {entrypoints!r}.items()}}))\n")
    loaded = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    schemas = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert set(schemas) == {"data", "pretrain", "branch", "genesis", "milestone-watcher"}
    for name, schema in schemas.items():
        assert "$ref" not in json.dumps(schema) and not schema.get("definitions"), (name, schema)
        required = set(schema.get("required", []))
        for field, spec in schema["properties"].items():
            types = {spec.get("type")} | {option.get("type") for option in spec.get("anyOf", [])}
            assert types & {"string", "integer", "boolean", "array"} and "object" not in types, (name, field, spec)
            assert len(spec.get("description", "")) > 10, (name, field, spec)
            assert "default" in spec or field in required, (name, field, spec)
        assert {field for field in schema["properties"] if field in required} <= {"milestone"}, name
    data = schemas["data"]["properties"]
    assert data["corpus"]["default"] == "configs/corpus/builtin.yaml" and data["corpus"]["type"] == "string"
    assert data["overrides"]["default"] == [] and data["overrides"]["items"] == {"type": "string"}
    pretrain = schemas["pretrain"]["properties"]
    assert pretrain["nproc"]["type"] == "integer" and pretrain["nproc"]["minimum"] == 1
    assert schemas["branch"]["required"] == ["milestone"]
    assert schemas["milestone-watcher"]["properties"]["launch"]["enum"] == ["deployment", "inline"]


def test_a_progress_artifact_that_cannot_be_written_never_stops_the_trunk(harness, tmp_path, monkeypatch):
    from prefect import flow

    import tasks.artifacts

    (tmp_path / "trunk").mkdir()
    (tmp_path / "trunk" / "latest.json").write_text(json.dumps({"step": 5}))

    @flow
    def shows_progress() -> list:
        progress = tasks.artifacts.TrunkProgress(tmp_path / "trunk", 10)
        return [progress.update(force=True), progress.update(force=True)]

    assert shows_progress() == [50.0, 50.0]

    def unreachable(*args, **kwargs):
        raise RuntimeError("Prefect API unreachable")

    monkeypatch.setattr(tasks.artifacts, "create_progress_artifact", unreachable)
    assert shows_progress() == [None, None]  # warned, and the trunk's task goes on


@pytest.mark.slow
def test_a_pretrain_flow_run_shows_the_trunk_task_and_a_progress_artifact_that_reaches_100(
        harness, tracking, tiny_corpus, tmp_path, monkeypatch):
    import tasks.artifacts
    from flows.pretrain import pretrain_flow

    shown = []
    for name in ("create_progress_artifact", "update_progress_artifact"):
        real = getattr(tasks.artifacts, name)

        def recorded(*args, real=real, **kwargs):
            shown.append(args[0] if real.__name__.startswith("create") else args[1])
            return real(*args, **kwargs)

        monkeypatch.setattr(tasks.artifacts, name, recorded)
    monkeypatch.setattr(tasks.artifacts, "PROGRESS_SECONDS", 0.0)  # every trainer line refreshes it

    state = pretrain_flow(train_config=str(TINY_CPU), data_dir=str(tiny_corpus), run_dir=str(tmp_path / "trunk"),
                          max_steps=24, nproc=1, overrides=["model.vocab_size=2048", "micro_batch_size=4", "log_every=2",
                                                            "checkpoint.save_every=24", "checkpoint.milestone_every=24",
                                                            "eval.every=0", "optimizer.warmup_steps=2"],
                          return_state=True)
    assert state.is_completed(), state.message
    assert task_names(state)["trunk"] == "Completed"
    # Refreshed while the trainer went: steps between the first and the last, then 100 at the end.
    assert shown == sorted(shown) and shown[-1] == 100.0 and any(0 < p < 100 for p in shown), shown
    (progress,) = [a for a in flow_run_artifacts(state) if a.type == "progress"]
    assert progress.data == 100.0 and "step 24 of 24" in progress.description
    assert progress.key == "trunk-trunk" and progress.task_run_id is not None


@pytest.mark.slow
def test_a_branch_flow_run_publishes_its_evaluation_as_a_table_and_its_lineage_as_markdown(
        harness, tracking, tiny_trunk, tmp_path):
    from flows.branches import branch_flow

    trunk = tmp_path / "trunk"  # a copy: the branch exports the milestone into its trunk
    trunk.mkdir()
    for name in ("config.yaml", "metrics.jsonl"):
        shutil.copy2(tiny_trunk / name, trunk / name)
    shutil.copytree(tiny_trunk / "milestones" / "step_00000150", trunk / "milestones" / "step_00000150")
    milestone = trunk / "milestones" / "step_00000150"
    evaluation = None
    for attempt in ("grown", "cached"):  # a rerun (the event and the watcher both fire) publishes them again
        state = branch_flow(str(milestone), out=str(tmp_path / "branch"), overrides=QUICK_BRANCH, return_state=True)
        assert state.is_completed(), state.message
        artifacts = {artifact.type: artifact for artifact in flow_run_artifacts(state)}
        assert set(artifacts) == {"table", "markdown"}, (attempt, artifacts)

        evaluation = json.loads((tmp_path / "branch" / "eval.json").read_text())
        table = json.loads(artifacts["table"].data)
        assert [row["stage"] for row in table] == ["sft", "dpo"]
        assert [row["model"] for row in table] == ["genesis-sft v1", "genesis-dpo v1"]
        for row in table:
            for metric in ("preference_accuracy", "format_adherence", "hedging_score", "mean_reply_chars"):
                assert row[metric] == pytest.approx(evaluation[row["stage"]][metric], abs=1e-4)
        assert artifacts["table"].key == "branch-trunk-step-150-eval"

        lineage = artifacts["markdown"].data
        assert artifacts["markdown"].key == "branch-trunk-step-150-lineage"
        for text in ("| genesis-base | v1 | milestone step 150", "| genesis-sft | v1 | genesis-base v1 |",
                     "| genesis-dpo | v1 | genesis-sft v1 |", str(milestone), str(tmp_path / "branch" / "dpo"),
                     f"MLFLOW_TRACKING_URI={tracking} genesis generate --model models:/genesis-dpo/1"):
            assert text in lineage, (text, lineage)
    assert evaluation is not None and Path(tmp_path / "branch" / "eval.json").is_file()
