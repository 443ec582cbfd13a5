"""What the page shows, read from a run directory (and, when configured, the MLflow registry).

Plain Python, no web framework: status from `latest.json`, curves from `metrics.jsonl`, the tree from
`milestones/` and `branches/`, and the catalogue of models a visitor may try. Every reader tolerates a run that
is being written right now: a half-written line is skipped, an unreadable `latest.json` keeps the last good
copy and says so, a run with nothing yet says that plainly.

Models are named by ids, never by paths: `checkpoint/step_00000050`, `milestone/step_00000150`,
`branch/step_00000150/sft`, `registry/genesis-dpo/3`. An id resolves only through the catalogue, so a visitor
cannot reach a file outside the run directory however the id is spelled.
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from genesis.errors import GenesisError
from genesis_model.gpu_stats import gpus_from_metrics
from genesis.run_dir import (ARCHIVE_DIR, BRANCHES_DIR, LATEST, METRICS, MILESTONE_DIR, ROLLING_DIR, MetricsReader,
                             RunDir, is_complete, is_cooldown_row, stage_complete, step_of)

STEP_DIR = r"step_\d{8}"
MODEL_ID = re.compile(rf"(checkpoint|milestone|archive)/({STEP_DIR})|branch/({STEP_DIR})/(sft|dpo)|registry/([\w.-]+)/(\d+)")
BRANCH_STAGES = ("sft", "dpo")
CURVE_KEYS = ("loss", "lr", "grad_norm", "tokens_per_s", "mfu")


class UnknownModel(GenesisError):
    """A model id that is not in the catalogue (misspelt, removed, or an attempt at a path)."""


@dataclass(frozen=True)
class ModelEntry:
    id: str
    kind: str  # checkpoint | milestone | archive | sft | dpo | registry
    label: str
    step: int | None
    location: str  # a checkpoint dir, an HF dir, or a models:/ URI; never sent to the browser

    def public(self) -> dict:
        return {"id": self.id, "kind": self.kind, "label": self.label, "step": self.step}


class RunView:
    def __init__(self, run_dir: Path, tracking_uri: str | None = None):
        self.run_dir = Path(run_dir).resolve()
        self.tracking_uri = tracking_uri
        self._last_good_latest: dict | None = None
        self._curves = CurveReader(self.run_dir / METRICS)
        self._registry_cache: tuple[float, list[dict], str | None] | None = None
        self._lock = threading.Lock()

    # ---------------------------------------------------------------------------------------------------------
    # Status

    def status(self) -> dict:
        """The trainer's `latest.json`, with the newest logged metrics filled in and plain-words problems."""
        path = self.run_dir / LATEST
        problem = None
        latest = None
        if path.is_file():
            try:
                latest = json.loads(path.read_text())
                if not isinstance(latest, dict):
                    raise ValueError("not a JSON object")
                self._last_good_latest = latest
            except (ValueError, OSError) as err:
                problem = f"latest.json could not be read ({type(err).__name__}); showing the last good copy"
                latest = self._last_good_latest
        elif not self.run_dir.is_dir():
            problem = f"run directory {self.run_dir} does not exist"
        else:
            problem = "no latest.json yet: the trainer has not started in this run directory"
        last_row = self._curves.last_row()
        state = dict(latest or {})
        for key in ("loss", *CURVE_KEYS, "eta_s", "memory_gib", "tokens_seen"):
            if state.get(key) is None and last_row.get(key) is not None:
                state[key] = last_row[key]
        target = state.get("target_step")
        step = state.get("step")
        progress = min(1.0, step / target) if isinstance(step, int) and isinstance(target, int) and target > 0 else None
        updated = state.get("updated")
        return {
            "run_dir": self.run_dir.name,
            "problem": problem,
            "state": state.get("status", "no run yet" if latest is None else "unknown"),
            "step": step,
            "target_step": target,
            "progress": progress,
            "loss": state.get("loss"),
            "lr": state.get("lr"),
            "grad_norm": state.get("grad_norm"),
            "tokens_per_s": state.get("tokens_per_s"),
            "mfu": state.get("mfu"),
            "eta_s": state.get("eta_s") if state.get("status") == "training" else None,
            "tokens_seen": state.get("tokens_seen"),
            "val_loss": state.get("val_loss"),
            "last_checkpoint": _checkpoint_label(state.get("last_checkpoint")),
            "last_milestone": _checkpoint_label(state.get("last_milestone")),
            "seconds_since_update": (time.time() - updated) if isinstance(updated, (int, float)) else None,
            # each rank's GPU at the last logged step ([] without a GPU)
            "gpus": gpus_from_metrics(state) or gpus_from_metrics(last_row),
        }

    def curves(self, since_step: int = -1) -> dict:
        return self._curves.series(since_step)

    # ---------------------------------------------------------------------------------------------------------
    # The tree and the catalogue

    def tree(self) -> dict:
        """Trunk → milestones → branches (SFT, DPO with their eval figures), plus registry versions if configured."""
        milestones = []
        for path in sorted((self.run_dir / MILESTONE_DIR).glob("step_*")):
            if not (path.is_dir() and is_complete(path)):
                continue
            branch_dir = RunDir(self.run_dir).branch(path)
            branch = None
            if branch_dir.root.is_dir():
                branch = {stage: stage_complete(branch_dir.root / stage) for stage in BRANCH_STAGES}
                branch["eval"] = _summarise_eval(branch_dir.eval_path)
                # NOTE: the lock file's presence, not a probe of the lock: taking it, even for a moment, could make
                # a branch that starts at that instant refuse to run.
                branch["in_progress"] = not branch["eval"] and branch_dir.lock().path.exists()
            milestones.append({"name": path.name, "step": step_of(path.name), "id": f"milestone/{path.name}",
                               "branch": branch})
        rolling = [p.name for p in sorted((self.run_dir / ROLLING_DIR).glob("step_*")) if is_complete(p)]
        registry, registry_problem = self._registry()
        return {"run_dir": self.run_dir.name, "milestones": milestones, "checkpoints": rolling,
                "registry": registry, "registry_problem": registry_problem}

    def models(self) -> list[ModelEntry]:
        entries = []
        for sub, kind in ((ROLLING_DIR, "checkpoint"), (MILESTONE_DIR, "milestone"), (ARCHIVE_DIR, "archive")):
            for path in sorted((self.run_dir / sub).glob("step_*")):
                if re.fullmatch(STEP_DIR, path.name) and path.is_dir() and is_complete(path):
                    entries.append(ModelEntry(f"{kind}/{path.name}", kind, f"{kind} step {step_of(path.name)}",
                                              step_of(path.name), str(path)))
        for branch_dir in sorted((self.run_dir / BRANCHES_DIR).glob("step_*")):
            for stage in BRANCH_STAGES:
                model_dir = branch_dir / stage
                if re.fullmatch(STEP_DIR, branch_dir.name) and stage_complete(model_dir):
                    step = step_of(branch_dir.name)
                    entries.append(ModelEntry(f"branch/{branch_dir.name}/{stage}", stage,
                                              f"{stage.upper()} of step {step}", step, str(model_dir)))
        registry, _ = self._registry()
        for version in registry:
            entries.append(ModelEntry(f"registry/{version['name']}/{version['version']}", "registry",
                                      f"{version['name']} v{version['version']}", version.get("step"),
                                      f"models:/{version['name']}/{version['version']}"))
        # NOTE: checkpoints and milestones of the same step share weights; both are listed because a rolling
        # checkpoint disappears with keep-last-K while the milestone stays.
        kind_order = {kind: index for index, kind in enumerate(("checkpoint", "milestone", "archive", "sft",
                                                                       "dpo", "registry"))}
        return sorted(entries, key=lambda e: (e.step is None, e.step or 0, kind_order[e.kind], e.id))

    def resolve(self, model_id: str) -> ModelEntry:
        if not isinstance(model_id, str) or not MODEL_ID.fullmatch(model_id):
            raise UnknownModel(f"model {model_id!r}: not a model id; choose one listed by /api/models")
        for entry in self.models():
            if entry.id == model_id:
                return entry
        raise UnknownModel(f"model {model_id!r}: not in this run (removed, or not finished yet); /api/models lists them")

    def _registry(self) -> tuple[list[dict], str | None]:
        """Registered versions from MLflow, cached for 30 s; ([], reason) when it cannot be read."""
        if not self.tracking_uri:
            return [], None
        with self._lock:
            if self._registry_cache and time.monotonic() - self._registry_cache[0] < 30:
                return self._registry_cache[1], self._registry_cache[2]
            try:
                from lineage.registry import MODEL_NAMES, connect

                client = connect(self.tracking_uri).client
                versions = []
                for name in MODEL_NAMES:
                    for version in client.search_model_versions(f"name='{name}'"):
                        step = version.tags.get("milestone_step")
                        versions.append({"name": name, "version": int(version.version),
                                         "step": int(step) if step and step.isdigit() else None,
                                         "parent": (f"{version.tags['parent_model']}/{version.tags['parent_version']}"
                                                    if version.tags.get("parent_model") else None)})
                result = (sorted(versions, key=lambda v: (v["name"], v["version"])), None)
            except Exception as err:  # noqa: BLE001 - the page keeps working without the registry
                result = ([], f"MLflow registry unavailable: {str(err).splitlines()[0][:200]}")
            self._registry_cache = (time.monotonic(), *result)
            return result


class CurveReader:
    """The curves of metrics.jsonl, kept in memory and extended with what each call finds appended."""

    def __init__(self, path: Path):
        self.path = path
        self._reader = MetricsReader(path)
        self._rows: list[dict] = []
        self._lock = threading.Lock()
        # Bumped whenever the file is found replaced, so a page that appends by step knows to start over.
        self.generation = 0

    def _refresh(self) -> None:
        with self._lock:
            rows, replaced = self._reader.read_new()
            if replaced:  # a new run in the same dir: start over
                self._rows = []
                self.generation += 1
            self._rows += [row for row in rows if not is_cooldown_row(row)]  # the trunk's history only

    def last_row(self) -> dict:
        self._refresh()
        return self._rows[-1] if self._rows else {}

    def series(self, since_step: int = -1) -> dict:
        """{"train": {key: [[step, value], ...]}, "val": {source: [[step, value], ...]}} for steps > since_step,
        plus `last_step` and the file's `generation`.

        A run resumed from an earlier checkpoint logs some steps twice (the file is appended to); the later
        row of a step wins, so the curve shows the history the checkpoints actually hold.
        """
        self._refresh()
        latest_by_step = {row["step"]: row for row in self._rows if row["step"] > since_step}
        train: dict[str, list] = {key: [] for key in CURVE_KEYS}
        val: dict[str, list] = {}
        last_step = since_step
        for step in sorted(latest_by_step):
            row = latest_by_step[step]
            last_step = step
            for key in CURVE_KEYS:
                if isinstance(row.get(key), (int, float)):
                    train[key].append([step, row[key]])
            for key, value in row.items():
                if key.startswith("val_loss/") and isinstance(value, (int, float)):
                    val.setdefault(key.removeprefix("val_loss/"), []).append([step, value])
        return {"last_step": last_step, "generation": self.generation,
                "train": {k: v for k, v in train.items() if v}, "val": val}


def _checkpoint_label(path: str | None) -> str | None:
    """`…/milestones/step_00000150` → `milestone step 150`: the page never shows absolute paths."""
    if not path:
        return None
    path = Path(path)
    if not re.fullmatch(STEP_DIR, path.name):
        return path.name
    kind = "milestone" if path.parent.name == MILESTONE_DIR else "checkpoint"
    return f"{kind} step {step_of(path.name)}"


def _summarise_eval(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        result = json.loads(path.read_text())
    except ValueError:
        return None
    keys = ("preference_accuracy", "format_adherence", "hedging_score", "curiosity_score")
    return {stage: {k: result.get(stage, {}).get(k) for k in keys} for stage in BRANCH_STAGES} | {
        "samples": result.get("samples", [])[:3]}
