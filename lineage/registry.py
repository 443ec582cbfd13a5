"""MLflow lineage and the model registry: every stage a run, every milestone and branch a model version.

Tracking defaults to SQLite in the project's home (`$GENESIS_HOME`, default `<repo>/runs/mlflow`):
`mlflow ui --backend-store-uri sqlite:///<home>/mlflow.db` browses it. `MLFLOW_TRACKING_URI` or a flow's
`tracking_uri` parameter points anywhere else. The `genesis` experiment is a model-training one (tag
mlflow.experimentKind = custom_model_development), so the UI opens it on its runs, not on GenAI traces.

Runs nest as the tree grows (lineage/tracking.py opens them, each for as long as the work it records):
  data <corpus>                 the corpus's sources as inputs, token counts, report and manifest
  pretrain <trunk>              the manifest and each source's shards as inputs; loss, lr, val_loss/*; system metrics
  └── milestone step N          the milestone's export, logged as an MLflow model; val_loss/* at N
      └── sft step N            sft.jsonl as input; train/* as it trains; the SFT model; eval metrics
          └── dpo step N        dpo_train.jsonl as input; train/*; the DPO model; eval metrics

The registry holds the models, logged as MLflow models (transformers flavor, lineage/models.py), so
`mlflow.pyfunc.load_model("models:/genesis-dpo@champion")` and `mlflow models serve` work on any version:
  genesis-base  one version per milestone   tags: run_dir, milestone_step, milestone_path, data_digest, code_version
  genesis-sft   one version per branch      tags: parent_model=genesis-base, parent_version, milestone_step, ...
  genesis-dpo   one version per branch      tags: parent_model=genesis-sft, parent_version, milestone_step, ...
Each version's description links its parent version and the run that made it.
Aliases: `step-<N>` on every version; `champion` starts on a model's first version that is not flagged and moves
only with `genesis promote NAME VERSION|ALIAS`; `latest`, in Genesis's commands, is the newest version that is not
flagged. A DPO version whose format adherence fell more than `eval.max_format_drop` below its SFT parent's carries
the tag `format_regressed=true` (eval.json's `format_check`) and is marked on the tree. MLflow reserves `latest`
for the newest version of all: its own loaders (`mlflow.pyfunc.load_model("models:/genesis-dpo@latest")`) still
resolve it so; name @champion there.

Registration is idempotent: a milestone or branch already registered (same milestone path) returns its
existing version, so a branch triggered twice (event and watcher) registers once.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from genesis.config import REPO_ROOT
from genesis.errors import GenesisError
from lineage.models import model_dir_of
from lineage.stages import BranchStageRecorder
from lineage.tracking import (BASE, DPO, EXPERIMENT, MODEL_NAMES, SFT, MetricsFollower, Tracker,  # noqa: F401
                              code_version)

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"  # MLflow 3's "Machine learning" experiment type (vs genai_development)
CHAMPION = "champion"
LATEST = "latest"  # MLflow's reserved alias; Genesis resolves it itself: the newest version not flagged
FORMAT_FLAG = "format_regressed"  # a version tag: "true" on a DPO model that lost format adherence (eval.json)


class RegistryError(GenesisError):
    """The tracking server cannot be reached, or a model URI does not resolve."""


def genesis_home() -> Path:
    return Path(os.environ.get("GENESIS_HOME", REPO_ROOT / "runs" / "mlflow")).resolve()


def default_tracking_uri() -> str:
    return f"sqlite:///{genesis_home() / 'mlflow.db'}"


def tracking_uri(explicit: str | None = None) -> str:
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


# MLflow's INFO chatter (creating the SQLite tables, "Skip logging GPU metrics", "Started monitoring system
# metrics" at every run), huggingface_hub's note on each model logged ("Repo card metadata block was not found")
# and torchao's on being imported by transformers as a model is logged (its CUDA extensions not loadable, no
# Triton; Genesis needs neither unless parallel.float8, which checks for itself; torch's notes on the enums it
# registers): not what a flow's log is for. MLflow's warnings still show.
CHATTY_MLFLOW_LOGGERS = ("mlflow.store.db.utils", "mlflow.system_metrics", "alembic", "huggingface_hub.repocard",
                         "torchao", "torch.utils._pytree")


def quiet_mlflow() -> None:
    import logging

    for name in CHATTY_MLFLOW_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR if name.startswith(("huggingface_hub", "torch"))
                                         else logging.WARNING)


def connect(uri: str | None = None) -> Tracker:
    """Check the tracking URI is usable and return a Tracker; one-line RegistryError if not.

    The process's lineage then goes there: MLflow's fluent URI is set to it, and a branch grown in this process
    (branch/pipeline.py) records its SFT and DPO stages as runs while they train (lineage/stages.py)."""
    import mlflow
    from mlflow import MlflowClient

    quiet_mlflow()
    uri = tracking_uri(uri)
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    elif uri.startswith(("http://", "https://")):
        _check_http(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        experiment = client.get_experiment_by_name(EXPERIMENT)
        if experiment is None:
            location = None
            if uri.startswith("sqlite:///"):
                location = (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").as_uri()
            experiment_id = client.create_experiment(EXPERIMENT, artifact_location=location,
                                                     tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING})
        else:
            experiment_id = experiment.experiment_id
            kind = experiment.tags.get(EXPERIMENT_KIND_TAG, "")
            if not kind or kind.endswith("_inferred") or kind == "no_inferred_type":
                client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
    except Exception as err:  # noqa: BLE001 - any store failure becomes one actionable line
        raise RegistryError(f"MLflow tracking URI {uri}: unusable ({str(err).splitlines()[0][:160]}); "
                            f"fix tracking_uri or MLFLOW_TRACKING_URI") from None
    tracker = Tracker(uri, experiment_id)
    from branch.pipeline import set_stage_recorder

    set_stage_recorder(BranchStageRecorder(tracker))
    return tracker


def _check_http(uri: str) -> None:
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5).read()
    except (urllib.error.URLError, OSError) as err:
        raise RegistryError(f"MLflow tracking URI {uri}: unreachable ({getattr(err, 'reason', err)}); start the "
                            f"server or fix tracking_uri / MLFLOW_TRACKING_URI") from None


# -------------------------------------------------------------------------------------------------------------
# Registry


def existing_version(tracker: Tracker, name: str, milestone_path: str):
    versions = tracker.client.search_model_versions(f"name='{name}' and tag.milestone_path='{milestone_path}'")
    return min(versions, key=lambda v: int(v.version)) if versions else None


def register_model(tracker: Tracker, name: str, model_id: str, run_id: str, tags: dict,
                   description: str = "") -> tuple[str, bool]:
    """Register the MLflow model `model_id` (logged by `run_id`) as a version of `name`, aliased `step-<N>` (and
    `champion` if the model has none yet). Returns (version, created); a version for the same milestone path is
    reused, never duplicated."""
    from mlflow.exceptions import MlflowException

    client = tracker.client
    existing = existing_version(tracker, name, tags["milestone_path"])
    if existing is not None:
        return str(existing.version), False
    try:
        client.create_registered_model(name, description=_DESCRIPTIONS[name])
    except MlflowException as err:
        if "RESOURCE_ALREADY_EXISTS" not in str(err.error_code):
            raise
    version = client.create_model_version(name, source=f"models:/{model_id}", run_id=run_id, model_id=model_id,
                                          tags={k: str(v) for k, v in tags.items()}, description=description)
    client.set_registered_model_alias(name, f"step-{tags['milestone_step']}", version.version)
    if CHAMPION not in aliases_of(tracker, name) and not _flagged(version):
        client.set_registered_model_alias(name, CHAMPION, version.version)
    return str(version.version), True


def _flagged(version) -> bool:
    return str((version.tags or {}).get(FORMAT_FLAG, "")).lower() == "true"


_DESCRIPTIONS = {
    BASE: "Pretrained trunk milestones (Hugging Face Llama directories logged as MLflow transformers models). "
          "Tags name the step, run and data digest.",
    SFT: "Supervised fine-tunes branching off genesis-base milestones, shaped by configs/principles.yaml. "
         "Chat models: mlflow.pyfunc takes {'messages': [...]}.",
    DPO: "DPO children of genesis-sft versions, preferring curious answers over hedging ones. "
         "Chat models: mlflow.pyfunc takes {'messages': [...]}.",
}


def version_description(tracker: Tracker, what: str, run_id: str, run_name: str,
                        parent: tuple[str, str] | None = None, parent_run_id: str | None = None) -> str:
    """A version's description (markdown the MLflow UI renders): what it is, its parent version and the run that
    made it, as links, and the same as plain URIs for whoever reads it elsewhere."""
    lines = [what, ""]
    if parent:
        name, version = parent
        lines.append(f"- Parent: [{name} v{version}](#/models/{name}/versions/{version}) (`models:/{name}/{version}`)")
    lines.append(f"- Run: [{run_name}]({tracker.run_link(run_id)}) (run id `{run_id}`)")
    if parent_run_id:
        lines.append(f"- Parent run: [{parent_run_id}]({tracker.run_link(parent_run_id)})")
    return "\n".join(lines)


def model_name(name: str) -> str:
    """genesis-dpo, or its short form dpo / sft / base."""
    full = name if name.startswith("genesis-") else f"genesis-{name}"
    if full not in MODEL_NAMES:
        raise RegistryError(f"{name}: not a Genesis model; choose one of {', '.join(MODEL_NAMES)}")
    return full


def aliases_of(tracker: Tracker, name: str) -> dict[str, str]:
    """alias → version of one registered model ({} if it is not registered); `latest` included: Genesis's own
    resolution, the newest version that is not flagged (MLflow's own `latest` is the newest of all, and MLflow
    reserves the name, so a flagged version cannot merely be left without it)."""
    from mlflow.exceptions import MlflowException

    try:
        model = tracker.client.get_registered_model(name)
    except MlflowException:
        return {}
    aliases = {alias: str(version) for alias, version in (model.aliases or {}).items()}
    unflagged = [v for v in tracker.client.search_model_versions(f"name='{name}'") if not _flagged(v)]
    if unflagged:
        aliases[LATEST] = str(max(int(v.version) for v in unflagged))
    return aliases


def find_version(tracker: Tracker, name: str, version_or_alias: str):
    """A ModelVersion by number (`3`, `v3`) or alias (`step-150`, `latest`, `champion`); one-line error if none."""
    from mlflow.exceptions import MlflowException

    target = version_or_alias.removeprefix("v") if re.fullmatch(r"v?\d+", version_or_alias) else version_or_alias
    if target.lower() == LATEST:
        target = aliases_of(tracker, name).get(LATEST)
        if target is None:
            raise RegistryError(f"{name} latest: no version of {name} in {tracker.uri} that is not flagged; "
                                f"`genesis lineage` shows the versions and their flags, name one by number")
    try:
        if target.isdigit():
            return tracker.client.get_model_version(name, target)
        return tracker.client.get_model_version_by_alias(name, target)
    except MlflowException as err:
        raise RegistryError(f"{name} {version_or_alias}: not found in {tracker.uri} ({str(err).splitlines()[0][:120]}); "
                            f"`genesis lineage` lists versions and aliases") from None


def promote(tracker: Tracker, name: str, version_or_alias: str, alias: str = CHAMPION) -> tuple[str, str | None]:
    """Point `alias` (champion) of model `name` at a version given by number or alias; returns (version, the
    version it pointed at before or None)."""
    name = model_name(name)
    if alias.lower() == LATEST:
        raise RegistryError("latest always points at the newest version (MLflow reserves it); promote to another alias")
    version = str(find_version(tracker, name, version_or_alias).version)
    before = aliases_of(tracker, name).get(alias)
    tracker.client.set_registered_model_alias(name, alias, version)
    return version, before


def resolve_model_uri(uri: str, tracking: str | None = None) -> Path:
    """`models:/NAME@ALIAS` (champion, latest, step-N), `models:/NAME/VERSION` or `models:/NAME/latest` → the
    local Hugging Face directory of that version (the MLflow model downloaded; its `model/` folder)."""
    import mlflow

    match = re.fullmatch(r"models:/([^/@]+)(?:@([^/]+)|/(\d+|latest))", uri or "")
    if not match:
        raise RegistryError(f"{uri}: not a model URI; use models:/NAME@ALIAS, models:/NAME/VERSION or models:/NAME@latest")
    name, alias, version = match.groups()
    tracker = connect(tracking)
    model_version = find_version(tracker, name, alias or version)
    return model_dir_of(Path(mlflow.artifacts.download_artifacts(artifact_uri=model_version.source,
                                                                 tracking_uri=tracker.uri)))


# -------------------------------------------------------------------------------------------------------------
# Lineage


def lineage(tracker: Tracker) -> list[dict]:
    """Milestones (genesis-base versions) with their branches: metrics from the registering runs, and the aliases
    (step-N, latest, champion) that point at each version."""
    client = tracker.client

    def versions(name):
        try:
            return client.search_model_versions(f"name='{name}'")
        except Exception:  # noqa: BLE001 - a registry without this model yet
            return []

    def metrics(version) -> dict:
        return client.get_run(version.run_id).data.metrics if version.run_id else {}

    aliases = {}
    for name in MODEL_NAMES:
        for alias, version in aliases_of(tracker, name).items():
            aliases.setdefault((name, version), []).append(alias)

    def node_of(name, version) -> dict:
        node = {"version": version.version, "metrics": metrics(version), "run_id": version.run_id,
                "aliases": sorted(aliases.get((name, str(version.version)), []), key=_alias_order)}
        if _flagged(version):
            node["flag"] = f"format -{float(version.tags.get('format_drop', 'nan')):.2f} vs its SFT parent"
        return node

    sft_by_parent, dpo_by_parent = {}, {}
    for version in versions(SFT):
        sft_by_parent.setdefault(str(version.tags.get("parent_version")), []).append(version)
    for version in versions(DPO):
        dpo_by_parent.setdefault(str(version.tags.get("parent_version")), []).append(version)
    tree = []
    for base in sorted(versions(BASE), key=lambda v: int(v.tags.get("milestone_step", 0))):
        node = {"name": BASE, **node_of(BASE, base), "step": int(base.tags.get("milestone_step", 0)),
                "run_dir": base.tags.get("run_dir"), "branches": []}
        for sft in sorted(sft_by_parent.get(str(base.version), []), key=lambda v: int(v.version)):
            branch = {"sft": node_of(SFT, sft), "dpo": None}
            children = dpo_by_parent.get(str(sft.version), [])
            if children:
                branch["dpo"] = node_of(DPO, min(children, key=lambda v: int(v.version)))
            node["branches"].append(branch)
        tree.append(node)
    return tree


def _alias_order(alias: str) -> tuple:
    return ({CHAMPION: 0, LATEST: 1}.get(alias, 2), alias)


def format_lineage(tree: list[dict]) -> str:
    if not tree:
        return "(nothing registered yet: run `genesis demo` or the genesis flow)"
    run_dirs = sorted({node["run_dir"] or "?" for node in tree})
    lines = []
    for run_dir in run_dirs:
        lines.append(f"trunk {run_dir}")
        nodes = [n for n in tree if (n["run_dir"] or "?") == run_dir]
        for index, node in enumerate(nodes):
            last = index == len(nodes) - 1
            val = node["metrics"].get("val_loss/all")
            lines.append(f"{'└──' if last else '├──'} step {node['step']:>7}  {BASE} v{node['version']}"
                         + (f"  val_loss {val:.3f}" if val is not None else "") + _aliases(node))
            pad = "    " if last else "│   "
            for branch in node["branches"]:
                sft, dpo = branch["sft"], branch["dpo"]
                lines.append(f"{pad}└── {SFT} v{sft['version']}{_branch_metrics(sft['metrics'])}{_aliases(sft)}")
                if dpo:
                    lines.append(f"{pad}    └── {DPO} v{dpo['version']}{_branch_metrics(dpo['metrics'])}{_aliases(dpo)}")
    lines.append("")
    lines.append("aliases (models:/NAME@ALIAS; `genesis promote NAME VERSION` moves champion):")
    for name in MODEL_NAMES:
        pointing = sorted({(alias, node["version"]) for node in _nodes_of(tree, name) for alias in node["aliases"]
                           if not alias.startswith("step-")}, key=lambda pair: _alias_order(pair[0]))
        if pointing:
            lines.append(f"  {name:<13} " + "  ".join(f"@{alias} → v{version}" for alias, version in pointing))
    return "\n".join(lines)


def _nodes_of(tree: list[dict], name: str) -> list[dict]:
    if name == BASE:
        return tree
    stage = "sft" if name == SFT else "dpo"
    return [branch[stage] for node in tree for branch in node["branches"] if branch[stage]]


def _aliases(node: dict) -> str:
    shown = f"  [{', '.join(node['aliases'])}]" if node.get("aliases") else ""
    return shown + (f"  FLAGGED: {node['flag']} (not @latest or @champion)" if node.get("flag") else "")


def _branch_metrics(metrics: dict) -> str:
    parts = []
    for key, label in (("preference_accuracy", "pref_acc"), ("format_adherence", "format"), ("hedging_score", "hedging")):
        if key in metrics:
            parts.append(f"{label} {metrics[key]:.2f}")
    return ("  " + "  ".join(parts)) if parts else ""
