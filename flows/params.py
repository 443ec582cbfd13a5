"""Flow parameters. Each flow takes plain typed arguments with defaults, each described in its docstring's
Args, which is what Prefect shows in a deployment's run form: every field with its type, default and description
(one nested model would show as a single untyped object). An unknown or ill-typed argument fails the run before
any work.

Here: the defaults the flows share, the constrained types, and what turns the arguments into what the tasks
take (absolute paths, loaded configs), so the flows only chain tasks. Paths in arguments are relative to the
repository (where deployments run) unless absolute.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

from pydantic import Field

from genesis.config import REPO_ROOT, BranchPlan, branch_plan_of, load_config
from genesis.errors import ConfigError
from genesis.run_dir import RunDir, read_meta

CORPUS = "configs/corpus/builtin.yaml"
DATA_DIR = "runs/demo/data"
TRAIN_CONFIG = "configs/train/tiny-demo.yaml"
BRANCH_FLOW = "branch-flow"  # its deployments: one per work pool that grows branches (prefect.yaml: branch)

Steps = Annotated[int, Field(gt=0)]
Processes = Annotated[int, Field(ge=1)]
Overrides = Sequence[str]  # dotted.key=value, applied over a config file


def repo_path(value: str | Path) -> Path:
    """Paths in parameters are relative to the repository (where deployments run)."""
    path = Path(value)
    return path if path.is_absolute() else (REPO_ROOT / path)


def absolute(value: str | Path) -> str:
    return str(repo_path(value).resolve())


def corpus_config(corpus: str, overrides: Overrides = ()):
    from data_prep.sources import CorpusConfig

    return load_config(CorpusConfig, repo_path(corpus), list(overrides))


def trainer_overrides(overrides: Overrides = (), *, data_dir: str | None = None, run_dir: str | None = None,
                      max_steps: int | None = None) -> list[str]:
    """`overrides`, then the arguments that override the training config (paths made absolute)."""
    result = list(overrides)
    for key, value in (("data_dir", data_dir), ("run_dir", run_dir)):
        if value is not None:
            result.append(f"{key}={absolute(value)}")
    if max_steps is not None:
        result.append(f"max_steps={max_steps}")
    return result


def branch_dir(milestone: str, out: str | None = None) -> str:
    """`out`, or the milestone's default branch directory (<run_dir>/branches/step_N)."""
    if out:
        return absolute(out)
    path = Path(absolute(milestone))
    return str(RunDir.of_checkpoint(path).branch(path).root)


def recipe(branch_config: str, overrides: Overrides = ()):
    from branch.config import BranchConfig

    return load_config(BranchConfig, repo_path(branch_config), list(overrides))


def branch_plan(milestone: str | Path) -> BranchPlan:
    """How the milestone's trunk branches: its config's `branches`, as saved in the milestone's meta.json."""
    return branch_plan_of(read_meta(repo_path(milestone)).get("config"), str(milestone))


def milestone_recipe(milestone: str, branch_config: str | None = None, overrides: Overrides = ()):
    """The recipe for a branch off `milestone`: `branch_config` + `overrides` when given, else the trunk's own
    (`branches.recipe` + `branches.overrides` of the config it trained with) + `overrides`."""
    if branch_config:
        return recipe(branch_config, overrides)
    plan = branch_plan(milestone)
    if plan.recipe is None:
        raise ConfigError(f"{milestone}: its trunk's config names no branch recipe (branches.recipe); pass "
                          f"branch_config=configs/branch/<name>.yaml, or set branches.recipe in the training config")
    return recipe(str(plan.recipe), [*plan.overrides, *overrides])


def branches_beside_trunk(train_config: str, overrides: Overrides = (), branch_config: str | None = None,
                          branch_overrides: Overrides = ()) -> bool:
    """Whether genesis_flow grows its branches while the trunk trains: the training config's branches.beside_trunk,
    else yes when the trunk or the branch recipe trains on the CPU (they share no GPU). Loads the recipe, so a
    bad one fails here, before any work."""
    from genesis.config import TrainConfig

    config = load_config(TrainConfig, repo_path(train_config), list(overrides))
    plan = config.branches
    if branch_config:
        branch = recipe(branch_config, branch_overrides)
    elif plan.recipe is not None:
        branch = recipe(str(plan.recipe), [*plan.overrides, *branch_overrides])
    else:
        raise ConfigError(f"{train_config}: names no branch recipe (branches.recipe); pass branch_config, set "
                          f"branches.recipe in the training config, or branch_milestones=false")
    if plan.beside_trunk is not None:
        return plan.beside_trunk
    return config.device == "cpu" or branch.device == "cpu"
