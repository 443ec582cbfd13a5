"""Typed flow parameters: the Prefect UI renders each as a form, and unknown fields are refused."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from genesis.config import REPO_ROOT, StrictModel


def repo_path(value: str | Path) -> Path:
    """Paths in parameters are relative to the repository (where deployments run)."""
    path = Path(value)
    return path if path.is_absolute() else (REPO_ROOT / path)


class DataParams(StrictModel):
    corpus: str = Field(default="configs/corpus/builtin.yaml", description="corpus config (configs/corpus/*.yaml)")
    data_dir: str = Field(default="runs/demo/data", description="where token shards and manifest.json go")
    overrides: list[str] = Field(default_factory=list, description="dotted.key=value overrides of the corpus config")


class PretrainParams(StrictModel):
    train_config: str = Field(default="configs/train/tiny-demo.yaml", description="configs/train/*.yaml")
    data_dir: str | None = Field(default=None, description="overrides the config's data_dir")
    run_dir: str | None = Field(default=None, description="overrides the config's run_dir (the trunk)")
    max_steps: int | None = Field(default=None, gt=0, description="target step of this cycle; raise it to "
                                  "continue the trunk (milestones already made are kept)")
    nproc: int = Field(default=2, ge=1, description="trainer processes on this machine (torchrun)")
    overrides: list[str] = Field(default_factory=list, description="dotted.key=value overrides")


class BranchParams(StrictModel):
    milestone: str = Field(description="a complete milestone checkpoint: <run_dir>/milestones/step_N")
    branch_config: str = Field(default="configs/branch/tiny.yaml", description="configs/branch/*.yaml")
    out: str | None = Field(default=None, description="branch directory; default <run_dir>/branches/step_N")
    overrides: list[str] = Field(default_factory=list, description="dotted.key=value overrides of the recipe")


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
