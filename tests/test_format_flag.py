"""DPO has cost format adherence in every measured run (#25 item 4). A DPO model whose format adherence falls more
than `eval.max_format_drop` below its SFT parent's is flagged in eval.json, in the registry (never @latest or
@champion by itself) and on the tree. MLflow on SQLite, real registry; the models are bare logged models (what
is registered is the point here, not the weights)."""

from __future__ import annotations

import pytest

from branch.config import EvalRecipe
from branch.evaluate import format_check
from lineage.record import dpo_format_check
from lineage.registry import (BASE, CHAMPION, DPO, FORMAT_FLAG, LATEST, SFT, RegistryError, aliases_of, connect, find_version,
                              format_lineage, lineage, promote, register_model)


def test_a_drop_over_the_threshold_is_flagged_and_one_at_it_is_not():
    assert EvalRecipe().max_format_drop == 0.02
    assert format_check(0.95, 0.80, 0.02) == {"sft": 0.95, "dpo": 0.80, "drop": 0.15, "max_drop": 0.02, "flagged": True}
    assert not format_check(0.95, 0.93, 0.02)["flagged"]
    assert not format_check(0.80, 0.87, 0.02)["flagged"]  # DPO better: a negative drop
    # A branch evaluated before the check existed is judged with the default threshold when it is registered.
    old = {"sft": {"format_adherence": 0.81}, "dpo": {"format_adherence": 0.75}}
    assert dpo_format_check(old)["flagged"] and dpo_format_check(old)["drop"] == pytest.approx(0.06)
    assert dpo_format_check({**old, "format_check": format_check(0.81, 0.75, 0.1)})["flagged"] is False


def register(tracker, step: int, flagged: bool | None, name: str = DPO, parent_version: str = "1") -> str:
    client = tracker.client
    run = client.create_run(tracker.experiment_id)
    model = client.create_logged_model(tracker.experiment_id, name=name, source_run_id=run.info.run_id)
    tags = {"milestone_step": step, "milestone_path": f"/trunk/milestones/step_{step}", "run_dir": "/trunk",
            "parent_version": parent_version}
    if flagged is not None:
        tags |= {FORMAT_FLAG: str(flagged).lower(), "format_drop": "0.0600" if flagged else "0.0100"}
    version, created = register_model(tracker, name, model.model_id, run.info.run_id, tags)
    assert created
    return version


def test_a_flagged_dpo_version_is_neither_latest_nor_champion_unless_promoted_by_hand(tmp_path):
    tracker = connect(f"sqlite:///{tmp_path / 'mlflow.db'}")
    first = register(tracker, 10, flagged=True)
    assert CHAMPION not in aliases_of(tracker, DPO) and LATEST not in aliases_of(tracker, DPO)
    with pytest.raises(RegistryError, match="not flagged") as err:
        find_version(tracker, DPO, "latest")
    assert "\n" not in str(err.value)
    assert str(find_version(tracker, DPO, "step-10").version) == first  # still reachable by its milestone or number

    second = register(tracker, 20, flagged=False)
    third = register(tracker, 30, flagged=True)
    aliases = aliases_of(tracker, DPO)
    assert aliases[LATEST] == second and aliases[CHAMPION] == second  # the newest unflagged; the first unflagged
    assert str(find_version(tracker, DPO, "latest").version) == second
    assert str(tracker.client.get_model_version_by_alias(DPO, "latest").version) == third  # MLflow's own: newest

    # A person may still choose a flagged model.
    assert promote(tracker, DPO, third) == (third, second)
    assert aliases_of(tracker, DPO)[CHAMPION] == third


def test_the_tree_marks_a_flagged_dpo_model(tmp_path):
    tracker = connect(f"sqlite:///{tmp_path / 'mlflow.db'}")
    register(tracker, 10, None, BASE)
    register(tracker, 10, None, SFT)
    register(tracker, 10, True, DPO)
    (node,) = lineage(tracker)
    assert node["branches"][0]["dpo"]["flag"] == "format -0.06 vs its SFT parent"
    assert "flag" not in node["branches"][0]["sft"]
    shown = format_lineage([node])
    assert "genesis-dpo v1  [step-10]  FLAGGED: format -0.06 vs its SFT parent (not @latest or @champion)" in shown
