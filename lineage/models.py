"""Genesis's Hugging Face directories logged as MLflow models (the transformers flavor).

    log_hf_model(tracker, run_id, model_dir, stage, description) -> model id (`models:/<id>` is its URI)

The directory is logged as a local checkpoint: MLflow copies it whole into the model's `model/` folder (weights,
tokenizer.model, tokenizer.json and config, the chat template with the system prompt the model was tuned with,
genesis_stage.json), writes MLmodel with a pyfunc flavor and an OpenAI-style signature, and links the model to the
run as its output. So a registered version loads everywhere MLflow models load:

    mlflow.pyfunc.load_model("models:/genesis-dpo@champion").predict({"messages": [...], "max_tokens": 64})
    mlflow.transformers.load_model("models:/genesis-dpo@latest")        # a transformers text-generation pipeline
    mlflow models serve -m models:/genesis-dpo@champion --env-manager local -p 5001

SFT and DPO models are logged for the `llm/v1/chat` task (messages in, a chat completion out, rendered by the
model's own chat template); a trunk milestone, which was never tuned to chat, for `llm/v1/completions`.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import threading
from contextlib import contextmanager
from pathlib import Path

from genesis.logs import quieted
from lineage.tracking import Tracker

MODEL_ARTIFACT = "model"  # the MLflow model's name; its `model/` folder is the Hugging Face directory
CHAT_TASK, COMPLETIONS_TASK = "llm/v1/chat", "llm/v1/completions"
CHAT_EXAMPLE = {"messages": [{"role": "user", "content": "Why is the sky blue?"}], "max_tokens": 64}
COMPLETIONS_EXAMPLE = {"prompt": "The sky is blue because", "max_tokens": 64}
REQUIREMENTS = ("torch", "transformers", "tokenizers", "safetensors", "sentencepiece")

_patch_lock = threading.Lock()


def log_hf_model(tracker: Tracker, run_id: str, model_dir: Path, stage: str, description: str = "") -> str:
    """Log the Hugging Face directory `model_dir` as the run's MLflow model (transformers flavor); returns the
    model id. `stage` is base, sft or dpo; `description` becomes the model card."""
    import mlflow
    import mlflow.transformers
    from huggingface_hub import ModelCard

    from genesis.run_dir import read_stage

    model_dir = Path(model_dir).resolve()
    chat = stage in ("sft", "dpo")
    metadata = {"genesis.stage": stage}
    if chat:
        metadata["system_prompt"] = read_stage(model_dir).get("system_prompt") or ""
    # The logged model goes to the genesis experiment, as the run's output (not to MLflow's default experiment).
    logged = tracker.client.create_logged_model(tracker.experiment_id, name=MODEL_ARTIFACT, source_run_id=run_id,
                                                tags={"genesis.stage": stage})
    mlflow.set_tracking_uri(tracker.uri)  # the model's artifacts are written through the fluent tracking URI
    with _quiet(), _pipeline_classes_resolved():
        mlflow.transformers.log_model(
            str(model_dir), name=MODEL_ARTIFACT, task=CHAT_TASK if chat else COMPLETIONS_TASK,
            input_example=CHAT_EXAMPLE if chat else COMPLETIONS_EXAMPLE, metadata=metadata,
            model_card=ModelCard(description or f"Genesis {stage} model"), pip_requirements=requirements(),
            run_id=run_id, model_id=logged.model_id)
    tracker.client.set_tag(run_id, "genesis.model_id", logged.model_id)
    return logged.model_id


def model_dir_of(local_model: Path) -> Path:
    """The Hugging Face directory inside a downloaded MLflow model (or the directory itself, for a version
    registered before models were logged as MLflow models)."""
    local_model = Path(local_model)
    return local_model / "model" if (local_model / "MLmodel").is_file() else local_model


def requirements() -> list[str]:
    """What serving the model needs, pinned to what logged it (local labels such as +cpu dropped: pip cannot
    resolve them)."""
    pinned = []
    for package in REQUIREMENTS:
        try:
            pinned.append(f"{package}=={importlib.metadata.version(package).split('+')[0]}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return pinned


@contextmanager
def _pipeline_classes_resolved():
    """MLflow (3.17, 3.18) names a local checkpoint's pipeline class by `check_task(task)[1]["impl"].__name__`;
    transformers 5 gives that impl as a dotted path string, so logging from a directory fails with
    AttributeError. While logging, check_task hands back the class itself, as transformers 4 did."""
    from transformers import pipelines

    original = pipelines.check_task
    if not isinstance(original("text-generation")[1].get("impl"), str):
        yield
        return

    def check_task(task):
        name, meta, options = original(task)
        if isinstance(meta.get("impl"), str):
            module, _, cls = meta["impl"].rpartition(".")
            meta = {**meta, "impl": getattr(importlib.import_module(module), cls)}
        return name, meta, options

    with _patch_lock:
        pipelines.check_task = check_task
        try:
            yield
        finally:
            pipelines.check_task = original


def _quiet():
    """MLflow's transformers flavor warns that a local directory has no Hub model card or license; Genesis writes
    its own card, and the rest says nothing a Genesis user can act on."""
    return quieted("mlflow.transformers")
