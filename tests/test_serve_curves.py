"""`genesis serve` reads a run's metrics.jsonl as the trainer writes it: replaced by a new run, or re-logged after
a resume."""

from __future__ import annotations

import json
import os
from pathlib import Path


def _log(path: Path, *steps_and_losses: tuple[int, float], mode: str = "a") -> None:
    with open(path, mode) as handle:
        for step, loss in steps_and_losses:
            handle.write(json.dumps({"step": step, "loss": loss}) + "\n")


def test_curves_start_over_with_a_new_generation_when_a_new_run_replaces_the_metrics_file(tmp_path):
    from serve.run_view import CurveReader

    metrics = tmp_path / "metrics.jsonl"
    _log(metrics, (1, 9.0), (2, 8.0), (3, 7.0))
    reader = CurveReader(metrics)
    first = reader.series()
    assert first["train"]["loss"] == [[1, 9.0], [2, 8.0], [3, 7.0]]

    replacement = tmp_path / "metrics.new"
    _log(replacement, (1, 10.5), (2, 10.1), (3, 9.9), (4, 9.8), mode="w")  # larger than the old file
    os.replace(replacement, metrics)
    second = reader.series(since_step=first["last_step"])
    assert second["generation"] != first["generation"]  # the page drops its points and asks again from -1
    assert reader.series()["train"]["loss"] == [[1, 10.5], [2, 10.1], [3, 9.9], [4, 9.8]]


def test_a_step_logged_again_after_a_resume_shows_its_later_value_once(tmp_path):
    from serve.run_view import CurveReader

    metrics = tmp_path / "metrics.jsonl"
    _log(metrics, (1, 9.0), (2, 8.0), (3, 7.5))  # crashed after step 3, resumed from the step-2 checkpoint
    _log(metrics, (3, 7.4), (4, 7.1))
    assert CurveReader(metrics).series()["train"]["loss"] == [[1, 9.0], [2, 8.0], [3, 7.4], [4, 7.1]]


def test_a_milestones_cooldown_rows_are_not_the_trunks_curve_and_do_not_move_its_last_step(tmp_path):
    # A trunk with forked cool-downs logs milestone 6's cool-down (steps 4-6, `cooldown/...` keys) while the trunk
    # is at step 3, then the trunk's own steps 4-6. The page asks by step: the trunk's steps must still arrive.
    from serve.run_view import CurveReader

    metrics = tmp_path / "metrics.jsonl"
    _log(metrics, (1, 9.0), (2, 8.0), (3, 7.5))
    with open(metrics, "a") as handle:
        for step, loss in ((4, 7.2), (5, 7.0), (6, 6.8)):
            handle.write(json.dumps({"step": step, "cooldown/loss": loss, "cooldown/lr": 1e-4}) + "\n")
        handle.write(json.dumps({"step": 6, "cooldown/val_loss/all": 6.9}) + "\n")
    reader = CurveReader(metrics)
    first = reader.series()
    assert first["last_step"] == 3 and first["train"]["loss"] == [[1, 9.0], [2, 8.0], [3, 7.5]]
    assert first["val"] == {}
    _log(metrics, (4, 7.4), (5, 7.3), (6, 7.2))
    assert reader.series(since_step=first["last_step"])["train"]["loss"] == [[4, 7.4], [5, 7.3], [6, 7.2]]
