"""Typed flow parameters: the Prefect UI renders each as a form, and unknown fields are refused. Each also
resolves itself into what the tasks take (absolute paths, loaded configs), so the flows only chain tasks."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from genesis.config import REPO_ROOT, StrictModel, load_config
from genesis.run_dir import RunDir


def repo_path(value: str | Path) -> Path:
    """Paths in parameters are relative to the repository (where deployments run)."""
    path = Path(value)
    return path if path.is_absolute() else (REPO_ROOT / path)


class DataParams(StrictModel):
    corpus: str = Field(default="configs/corpus/builtin.yaml", description="corpus config (configs/corpus/*.yaml)")
    data_dir: str = Field(default="runs/demo/data", description="where token shards and manifest.json go")
    overrides: list[str] = Field(default_factory=list, description="dotted.key=value overrides of the corpus config")

    def corpus_config(self):
        from data_prep.sources import CorpusConfig

        return load_config(CorpusConfig, repo_path(self.corpus), self.overrides)

    def data_path(self) -> str:
        return str(repo_path(self.data_dir).resolve())


class PretrainParams(StrictModel):
    train_config: str = Field(default="configs/train/tiny-demo.yaml", description="configs/train/*.yaml")
    data_dir: str | None = Field(default=None, description="overrides the config's data_dir")
    run_dir: str | None = Field(default=None, description="overrides the config's run_dir (the trunk)")
    max_steps: int | None = Field(default=None, gt=0, description="target step of this cycle; raise it to "
                                  "continue the trunk (milestones already made are kept)")
    nproc: int = Field(default=2, ge=1, description="trainer processes on this machine (torchrun)")
    overrides: list[str] = Field(default_factory=list, description="dotted.key=value overrides")

    def config_path(self) -> str:
        return str(repo_path(self.train_config))

    def train_overrides(self) -> list[str]:
        """`overrides`, then the fields that override the config (paths made absolute)."""
        overrides = list(self.overrides)
        for key in ("data_dir", "run_dir"):
            if getattr(self, key) is not None:
                overrides.append(f"{key}={repo_path(getattr(self, key)).resolve()}")
        if self.max_steps is not None:
            overrides.append(f"max_steps={self.max_steps}")
        return overrides


class BranchParams(StrictModel):
    milestone: str = Field(description="a complete milestone checkpoint: <run_dir>/milestones/step_N")
    branch_config: str = Field(default="configs/branch/tiny.yaml", description="configs/branch/*.yaml")
    out: str | None = Field(default=None, description="branch directory; default <run_dir>/branches/step_N")
    overrides: list[str] = Field(default_factory=list, description="dotted.key=value overrides of the recipe")

    def milestone_path(self) -> str:
        return str(repo_path(self.milestone).resolve())

    def branch_dir(self) -> str:
        if self.out:
            return str(repo_path(self.out).resolve())
        milestone = Path(self.milestone_path())
        return str(RunDir.of_checkpoint(milestone).branch(milestone).root)

    def recipe(self):
        from branch.config import BranchConfig

        return load_config(BranchConfig, repo_path(self.branch_config), self.overrides)


class GenesisParams(StrictModel):
    data: DataParams = DataParams()
    pretrain: PretrainParams = PretrainParams()
    branch_config: str = "configs/branch/tiny.yaml"
    branch_overrides: list[str] = Field(default_factory=list)
    branch_milestones: bool = Field(default=True, description="grow a branch at each milestone as it is reached")


class WatcherParams(StrictModel):
    run_dirs: list[str] = Field(default_factory=lambda: ["runs/demo/trunk"], description="trunks to watch")
    branch_config: str = "configs/branch/tiny.yaml"
    launch: Literal["deployment", "inline"] = Field(
        default="deployment", description="run each missing branch as a branch-flow deployment run, or in this flow")
    deployment: str = "branch-flow/branch"
