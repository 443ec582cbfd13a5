"""The learning-rate schedule of a trunk that grows (issue #25, item 1): warmup–stable–decay, no jump when
max_steps is raised, and a cosine run extended only by an explicit, logged re-warm-up. WSD's milestones are
cooled down either off a trunk that never decays (`cooldown: fork`, the default) or inside the trunk, which
re-warms after each (`cooldown: inline`). The schedule is a pure function, so most of this is asserted step by
step without training; slow tests run the real trainer through extensions and cool-downs."""

from __future__ import annotations

import json
import math

import pytest

from genesis.config import OptimizerConfig, TrainConfig, load_config
from genesis.errors import CheckpointError, ConfigError
from genesis_model.optim import check_schedule_continues, cooldown_lr, cooldown_steps, lr_at, rewarm_at
from genesis_model.train import check_resume_compatible
from tests.conftest import REPO, TINY_CPU, assert_ok, read_jsonl, run_trainer

PEAK, FLOOR = 3e-4, 3e-5
# The reference plan scaled down 100×: milestones every 20k (200), a cycle of 20k extended to 40k (200 → 400).
EVERY, WARMUP, REWARM = 200, 10, 5
EXACT = dict(rel=1e-12, abs=0.0)


def wsd(**changes) -> OptimizerConfig:
    """A trunk that cools into its milestones itself (the schedule these pure-function tests spell out)."""
    return OptimizerConfig(**{"lr": PEAK, "min_lr": FLOOR, "warmup_steps": WARMUP, "rewarm_steps": REWARM,
                              "schedule": "wsd", "cooldown": "inline", "decay_fraction": 0.2, **changes})


def cosine(**changes) -> OptimizerConfig:
    return OptimizerConfig(**{"lr": PEAK, "min_lr": FLOOR, "warmup_steps": WARMUP, "rewarm_steps": REWARM,
                              **changes})


def schedule(config: OptimizerConfig, max_steps: int, milestone_every: int = 0) -> list[float]:
    return [lr_at(step, config, max_steps, milestone_every) for step in range(max_steps)]


def expected_wsd(max_steps: int, shape: str) -> list[float]:
    """Written out independently: cycles of 200 (the last one ends at max_steps), a warm-up from 0 (first cycle)
    or from min_lr (later ones), the peak, then the last 20% cooling down to min_lr at the cycle's last update."""
    out = []
    for step in range(max_steps):
        start = step // EVERY * EVERY
        end = min(start + EVERY, max_steps)
        index, decay = step - start, round(0.2 * (end - start))
        warm, floor = (WARMUP, 0.0) if start == 0 else (REWARM, FLOOR)
        if index < warm:
            out.append(floor + (PEAK - floor) * (index + 1) / warm)
        elif index < (end - start) - decay:
            out.append(PEAK)
        else:
            progress = (index - ((end - start) - decay) + 1) / decay
            out.append(FLOOR + (PEAK - FLOOR) * ((1 - math.sqrt(progress)) if shape == "1-sqrt" else 1 - progress))
    return out


def largest_rise(lrs: list[float]) -> float:
    return max(b - a for a, b in zip(lrs, lrs[1:]))


def saved_config(optimizer: OptimizerConfig, max_steps: int, milestone_every: int = 0) -> dict:
    """The "config" a checkpoint's meta (and a run's run_meta) holds, as train.py writes it."""
    config = load_config(TrainConfig, TINY_CPU, [f"max_steps={max_steps}",
                                                 f"checkpoint.milestone_every={milestone_every}"])
    config.optimizer = optimizer
    return json.loads(config.model_dump_json())


def refusal(old: dict, new: dict, step: int) -> str:
    """The one-line error train.py's resume check raises (the other checks pass: same model, data kept)."""
    meta = {"model_fingerprint": "same", "config": old, "step": step}
    run_meta = {"model_fingerprint": "same", "tokenizer_sha256": "tok", "config": new}
    with pytest.raises(CheckpointError) as raised:
        check_resume_compatible(meta, run_meta, REPO / "run" / "checkpoints" / f"step_{step:08d}", reset_data=True)
    message = str(raised.value)
    assert "\n" not in message
    return message


def accepted(old: dict, new: dict, step: int) -> None:
    meta = {"model_fingerprint": "same", "config": old, "step": step}
    run_meta = {"model_fingerprint": "same", "tokenizer_sha256": "tok", "config": new}
    check_resume_compatible(meta, run_meta, REPO / "run", reset_data=True)


# ---------------------------------------------------------------------------------------------------------------
# WSD: every step of a trunk extended from a milestone


@pytest.mark.parametrize("shape", ["1-sqrt", "linear"])
def test_an_extended_wsd_trunk_has_the_planned_lr_at_every_step_and_no_jump(shape):
    config = wsd(decay_shape=shape)
    first = schedule(config, 200, EVERY)                  # the first cycle: 0 → 200 (20k)
    extended = schedule(config, 400, EVERY)               # max_steps raised to 400 (40k), --resume auto
    grown = schedule(config, 600, EVERY)                  # and once more (60k)

    for lrs, max_steps in ((first, 200), (extended, 400), (grown, 600)):
        assert lrs == pytest.approx(expected_wsd(max_steps, shape), **EXACT)
    # Raising max_steps changes nothing already trained: the resumed run goes on exactly.
    assert extended[:200] == first and grown[:400] == extended
    # Every milestone (saved after the update of step m-1) is fully decayed; the stable phases hold the peak.
    for milestone in (200, 400, 600):
        assert grown[milestone - 1] == FLOOR
    for start in (0, 200, 400):
        warm = WARMUP if start == 0 else REWARM
        assert all(lr == PEAK for lr in grown[start + warm:start + 160])
        cooldown = grown[start + 160:start + 200]
        assert all(b < a for a, b in zip(cooldown, cooldown[1:])) and cooldown[0] < PEAK
    # No jump: the LR rises only by warm-up increments; across the extension (step 199 → 200) by one re-warm step.
    assert largest_rise(grown) <= max(PEAK / WARMUP, (PEAK - FLOOR) / REWARM) * (1 + 1e-12)
    assert extended[200] - first[199] == pytest.approx((PEAK - FLOOR) / REWARM, **EXACT)
    # The re-warm-ups are the trainer's lr_rewarm events, at the milestones only.
    assert [step for step in range(600) if rewarm_at(step, config, 600, EVERY)] == [200, 400]
    assert rewarm_at(200, config, 600, EVERY) == {"schedule": "wsd", "from_lr": FLOOR, "to_lr": PEAK,
                                                  "steps": REWARM, "cycle_end": 400}


def test_resuming_a_wsd_trunk_past_a_milestone_is_accepted_and_off_a_milestone_needs_extended_from():
    config = wsd()
    old = saved_config(config, 200, EVERY)
    for step in (100, 180, 200):  # a rolling checkpoint in the stable phase, one in the cool-down, the milestone
        accepted(old, saved_config(config, 400, EVERY), step)
        assert check_schedule_continues(old, saved_config(config, 400, EVERY), step) is None

    # A cycle that ended off a milestone (max_steps 300) had cooled down toward 300: extending it to 400 would
    # put step 300 back at the peak. Refused, naming the option; with it, 300 ends a cycle and the next re-warms.
    off = saved_config(config, 300, EVERY)
    message = refusal(off, saved_config(config, 400, EVERY), 300)
    assert "optimizer.extended_from=[300]" in message and "max_steps 300 → 400" in message
    extended_config = wsd(extended_from=[300])
    accepted(off, saved_config(extended_config, 400, EVERY), 300)
    before, after = schedule(config, 300, EVERY), schedule(extended_config, 400, EVERY)
    assert after[:300] == before and after[299] == FLOOR
    assert after[300] == pytest.approx(FLOOR + (PEAK - FLOOR) / REWARM, **EXACT) and after[399] == FLOOR
    assert rewarm_at(300, extended_config, 400, EVERY)["cycle_end"] == 400


# ---------------------------------------------------------------------------------------------------------------
# Cosine: fixed length; extended only by choice


def test_extending_a_cosine_run_is_refused_in_one_line_and_with_extended_from_it_rewarms():
    plain = cosine()
    original = schedule(plain, 200)
    # The fixed-length schedule is the one it always was: linear warm-up, cosine to min_lr at max_steps.
    for step, lr in enumerate(original):
        if step < WARMUP:
            assert lr == pytest.approx(PEAK * (step + 1) / WARMUP, **EXACT)
        else:
            progress = (step - WARMUP) / (200 - WARMUP)
            assert lr == pytest.approx(FLOOR + 0.5 * (PEAK - FLOOR) * (1 + math.cos(math.pi * progress)), **EXACT)

    # Today's silent jump, now refused: at the end of the run (step 200) and from a paused run (step 100).
    assert lr_at(200, plain, 400) > 4 * FLOOR  # what raising max_steps alone would do to step 200
    old = saved_config(plain, 200)
    for step in (200, 100):
        message = refusal(old, saved_config(plain, 400), step)
        assert "optimizer.extended_from=[200]" in message and "re-warm" in message and f"step {step}" in message

    # The explicit choice: the old cycle ends where it was planned (200), then a logged re-warm-up from min_lr.
    chosen = cosine(extended_from=[200])
    for step in (200, 100):
        accepted(old, saved_config(chosen, 400), step)
    extended = schedule(chosen, 400)
    assert extended[:200] == original
    assert extended[200] == pytest.approx(FLOOR + (PEAK - FLOOR) / REWARM, **EXACT)
    assert extended[200 + REWARM - 1] == pytest.approx(PEAK, **EXACT)
    assert largest_rise(extended) <= max(PEAK / WARMUP, (PEAK - FLOOR) / REWARM) * (1 + 1e-12)
    assert extended[399] < FLOOR * 1.01
    assert rewarm_at(200, chosen, 400) == {"schedule": "cosine", "from_lr": FLOOR, "to_lr": PEAK, "steps": REWARM,
                                           "cycle_end": 400}
    assert [step for step in range(400) if rewarm_at(step, chosen, 400)] == [200]
    # Pausing and resuming with the same plan, or shortening it (the LR only falls), stays as it was.
    assert check_schedule_continues(old, saved_config(plain, 200), 100) is None
    assert check_schedule_continues(old, saved_config(plain, 160), 150) is None
    # Switching a mid-run cosine trunk to wsd would lift the LR too: refused, without a wrong suggestion.
    switched = refusal(old, saved_config(wsd(), 200), 100)
    assert "restore the checkpoint's optimizer schedule settings" in switched


# ---------------------------------------------------------------------------------------------------------------
# Configuration


@pytest.mark.parametrize("override, field", [
    ("optimizer.schedule=step", "optimizer.schedule"),
    ("optimizer.decay_fraction=0", "optimizer.decay_fraction"),
    ("optimizer.decay_fraction=1.5", "optimizer.decay_fraction"),
    ("optimizer.decay_shape=cubic", "optimizer.decay_shape"),
    ("optimizer.rewarm_steps=0", "optimizer.rewarm_steps"),
    ("optimizer.extended_from=[0]", "optimizer"),
])
def test_bad_schedule_settings_are_one_line_config_errors(override, field):
    with pytest.raises(ConfigError) as raised:
        load_config(TrainConfig, TINY_CPU, [override])
    message = str(raised.value)
    assert "\n" not in message and f"field '{field}" in message and str(TINY_CPU) in message


def test_the_growing_trunk_configs_keep_their_trunk_at_peak_and_cool_each_milestone_off_it():
    for name in ("genesis-1b-2x4090", "genesis-1b-h100", "tiny-demo"):
        config = load_config(TrainConfig, REPO / "configs" / "train" / f"{name}.yaml")
        optimizer, every = config.optimizer, config.checkpoint.milestone_every
        assert (optimizer.schedule, optimizer.cooldown, optimizer.decay_fraction) == ("wsd", "fork", 0.2), name
        assert every and config.max_steps % every == 0, name
        # The trunk: the warm-up, then the peak to the end, and as far as it is ever grown.
        lrs = schedule(optimizer, 2 * config.max_steps, every)
        assert lrs[optimizer.warmup_steps - 1:] == [optimizer.lr] * (2 * config.max_steps - optimizer.warmup_steps + 1)
        assert lrs[:config.max_steps] == schedule(optimizer, config.max_steps, every), name
        # Each milestone: a cool-down of 20% of a cycle, from the trunk's LR to min_lr at its last update.
        steps = cooldown_steps(optimizer, every)
        assert steps == round(0.2 * every), name
        cooled = [cooldown_lr(index, steps, optimizer.lr, optimizer) for index in range(steps)]
        assert cooled[-1] == optimizer.min_lr and cooled == sorted(cooled, reverse=True), name
    assert load_config(TrainConfig, TINY_CPU).optimizer.schedule == "cosine"


def test_forked_cooldowns_without_milestones_are_refused_in_one_line():
    with pytest.raises(ConfigError) as raised:
        load_config(TrainConfig, TINY_CPU, ["optimizer.schedule=wsd", "checkpoint.milestone_every=0"])
    message = str(raised.value)
    assert "\n" not in message and "optimizer.cooldown=inline" in message and "milestone_every" in message
    inline = load_config(TrainConfig, TINY_CPU, ["optimizer.schedule=wsd", "optimizer.cooldown=inline",
                                                 "checkpoint.milestone_every=0"])
    assert lr_at(inline.max_steps - 1, inline.optimizer, inline.max_steps) == inline.optimizer.min_lr
    # A single step given on the command line is a list of one.
    assert load_config(TrainConfig, TINY_CPU, ["optimizer.extended_from=300"]).optimizer.extended_from == [300]


# ---------------------------------------------------------------------------------------------------------------
# The real trainer


def logged_lrs(run_dir) -> dict[int, float]:
    return {row["step"]: row["lr"] for row in read_jsonl(run_dir / "metrics.jsonl")}


@pytest.mark.slow
def test_the_trainer_extends_an_inline_wsd_trunk_without_a_jump_and_a_cosine_one_only_by_choice(token_data, tmp_path):
    # Inline WSD: milestones every 6, a first cycle to 12, then max_steps raised to 18 with --resume auto.
    trunk = tmp_path / "wsd"
    common = ["checkpoint.save_every=0", "checkpoint.milestone_every=6", "optimizer.schedule=wsd",
              "optimizer.cooldown=inline", "optimizer.warmup_steps=2", "optimizer.rewarm_steps=2",
              "optimizer.decay_fraction=0.5"]
    assert_ok(run_trainer(trunk, token_data, ["max_steps=12", *common], nproc=1))
    assert_ok(run_trainer(trunk, token_data, ["max_steps=18", *common], ["--resume", "auto"], nproc=1))
    config = load_config(TrainConfig, TINY_CPU, ["max_steps=18", *common])
    lrs = logged_lrs(trunk)  # the metrics of step k are those of update k-1
    assert sorted(lrs) == list(range(1, 19))
    for step, lr in lrs.items():
        assert lr == pytest.approx(lr_at(step - 1, config.optimizer, 18, 6), **EXACT), step
    assert [lrs[m] for m in (6, 12, 18)] == [config.optimizer.min_lr] * 3
    assert lrs[3] == lrs[9] == lrs[15] == config.optimizer.lr  # the stable phases
    assert sorted(p.name for p in (trunk / "milestones").iterdir()) == ["step_00000006", "step_00000012",
                                                                        "step_00000018"]
    events = read_jsonl(trunk / "events.jsonl")
    assert [(e["step"], e["steps"]) for e in events if e["event"] == "lr_rewarm"] == [(6, 2), (12, 2)]

    # Cosine: raising max_steps is refused in one line, before anything is written; extended_from re-warms.
    fixed = tmp_path / "cosine"
    assert_ok(run_trainer(fixed, token_data, ["max_steps=4", "checkpoint.save_every=4", "optimizer.warmup_steps=2"],
                          nproc=1))
    before = (fixed / "metrics.jsonl").read_text()
    refused = run_trainer(fixed, token_data, ["max_steps=8", "optimizer.warmup_steps=2"], ["--resume", "auto"],
                          nproc=1)
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert refused.returncode != 0 and len(errors) == 1, refused.stderr[-3000:]
    assert "optimizer.extended_from=[4]" in errors[0] and "step_00000004" in errors[0]
    assert (fixed / "metrics.jsonl").read_text() == before
    assert_ok(run_trainer(fixed, token_data, ["max_steps=8", "optimizer.warmup_steps=2", "optimizer.extended_from=4",
                                              "checkpoint.save_every=4"], ["--resume", "auto"], nproc=1))
    extended = load_config(TrainConfig, TINY_CPU, ["max_steps=8", "optimizer.warmup_steps=2",
                                                   "optimizer.extended_from=4"]).optimizer
    lrs = logged_lrs(fixed)
    assert sorted(lrs) == list(range(1, 9))
    for step, lr in lrs.items():
        assert lr == pytest.approx(lr_at(step - 1, extended, 8), **EXACT), step
    rewarms = [e for e in read_jsonl(fixed / "events.jsonl") if e["event"] == "lr_rewarm"]
    assert [(e["step"], e["schedule"]) for e in rewarms] == [(4, "cosine")]


def trunk_rows(run_dir) -> dict[int, dict]:
    return {row["step"]: row for row in read_jsonl(run_dir / "metrics.jsonl") if "loss" in row}


@pytest.mark.slow
def test_each_milestone_is_cooled_off_a_trunk_that_trains_on_as_if_no_cooldown_had_happened(token_data, tmp_path):
    # Milestones every 6 with cool-downs of 3 (decay_fraction 0.5): forks at steps 3, 9 and 15; the trunk grown
    # 12 → 18 as a trunk grows. Beside it, the same trunk with no milestone in reach: nothing forks there.
    common = ["checkpoint.save_every=0", "optimizer.schedule=wsd", "optimizer.warmup_steps=2",
              "optimizer.decay_fraction=0.5"]
    forked, plain = tmp_path / "forked", tmp_path / "plain"
    for run_dir, every in ((forked, 6), (plain, 100)):
        assert_ok(run_trainer(run_dir, token_data, ["max_steps=12", f"checkpoint.milestone_every={every}", *common],
                              nproc=1))
        assert_ok(run_trainer(run_dir, token_data, ["max_steps=18", f"checkpoint.milestone_every={every}", *common],
                              ["--resume", "auto"], nproc=1))
    optimizer = load_config(TrainConfig, TINY_CPU, ["max_steps=18", "checkpoint.milestone_every=6", *common]).optimizer

    # The trunk never decays and never re-warms, and it trains exactly as if no cool-down had run: the same
    # weights, optimizer state and data position at every step (losses bit for bit).
    trunk, alone = trunk_rows(forked), trunk_rows(plain)
    assert sorted(trunk) == list(range(1, 19))
    assert [trunk[step]["loss"] for step in trunk] == [alone[step]["loss"] for step in trunk]
    assert [trunk[step]["lr"] for step in trunk] == [optimizer.lr / 2] + [optimizer.lr] * 17
    events = read_jsonl(forked / "events.jsonl")
    assert not [e for e in events if e["event"] == "lr_rewarm"]

    # Each milestone: 3 updates from the trunk at M − 3 over the data the trunk reads next, the LR falling to
    # min_lr at the last, evaluated, saved as an immutable milestone that names its fork.
    cooled = {row["step"]: row for row in read_jsonl(forked / "metrics.jsonl") if "cooldown/lr" in row}
    assert sorted(cooled) == [4, 5, 6, 10, 11, 12, 16, 17, 18]
    expected = [cooldown_lr(index, 3, optimizer.lr, optimizer) for index in range(3)]
    for milestone in (6, 12, 18):
        assert [cooled[step]["cooldown/lr"] for step in range(milestone - 2, milestone + 1)] == \
            pytest.approx(expected, **EXACT)
        assert cooled[milestone - 2]["cooldown/loss"] == trunk[milestone - 2]["loss"]  # same weights, same batch
        meta = json.loads((forked / "milestones" / f"step_{milestone:08d}" / "meta.json").read_text())
        assert meta["cooldown"]["from_step"] == milestone - 3 and meta["cooldown"]["steps"] == 3, meta
        assert meta["step"] == milestone and "all" in meta["val_loss"]
    assert expected[-1] == optimizer.min_lr
    finished = [(e["milestone"], e["outcome"]) for e in events if e["event"] == "cooldown_finished"]
    assert finished == [(6, "made"), (12, "made"), (18, "made")]

    # The trunk resumes from its own state, never from a cooled milestone of the same step.
    from genesis.run_dir import latest_checkpoint

    newest = latest_checkpoint(forked)
    assert (newest.step, newest.milestone) == (18, False)


@pytest.mark.slow
def test_a_non_finite_update_inside_a_cooldown_is_skipped_and_the_milestone_is_made_once(token_data, tmp_path):
    # The cool-down of milestone 6 (from step 3) meets a NaN at its last update (injected at update 6): the update
    # is skipped as the trunk's would be, the weights before it pass the save checks, and the milestone is made
    # from them, once: the cool-down is not started again from steps 4 and 5. The trunk meets the same NaN later
    # and goes on to its end.
    run_dir = tmp_path / "trunk"
    assert_ok(run_trainer(run_dir, token_data, ["max_steps=8", "checkpoint.milestone_every=6", "checkpoint.save_every=0",
                                                "optimizer.schedule=wsd", "optimizer.warmup_steps=2",
                                                "optimizer.decay_fraction=0.5"],
                          nproc=1, env={"GENESIS_INJECT_NAN_STEPS": "6"}))
    events = read_jsonl(run_dir / "events.jsonl")
    assert [(e["step"], e["milestone"]) for e in events if e["event"] == "cooldown_started"] == [(3, 6)]
    assert [e["outcome"] for e in events if e["event"] == "cooldown_finished"] == ["made"]
    cooled = [row for row in read_jsonl(run_dir / "metrics.jsonl") if "cooldown/loss" in row]
    assert [math.isfinite(row["cooldown/loss"]) for row in cooled] == [True, True, False]
    meta = json.loads((run_dir / "milestones" / "step_00000006" / "meta.json").read_text())
    assert meta["cooldown"]["from_step"] == 3 and meta["nonfinite_skipped"] == 1
    assert json.loads((run_dir / "latest.json").read_text())["step"] == 8


@pytest.mark.slow
def test_two_ranks_with_asynchronous_saves_fork_a_cooldown_alike(token_data, tmp_path):
    # Rank 0 completes an async save in a thread of its own: every rank must still see the same run directory
    # when it decides to save the fork and which checkpoint to load back (else one rank saves alone and hangs).
    from genesis.run_dir import latest_checkpoint

    run_dir = tmp_path / "trunk"
    assert_ok(run_trainer(run_dir, token_data, ["max_steps=6", "checkpoint.milestone_every=6", "checkpoint.save_every=3",
                                                "checkpoint.async_save=true", "optimizer.schedule=wsd",
                                                "optimizer.warmup_steps=2", "optimizer.decay_fraction=0.5"],
                          nproc=2, timeout=300))
    meta = json.loads((run_dir / "milestones" / "step_00000006" / "meta.json").read_text())
    assert meta["cooldown"]["from_step"] == 3 and meta["world_size"] == 2
    newest = latest_checkpoint(run_dir)
    assert (newest.step, newest.milestone) == (6, False)


def test_a_wsd_trunk_saved_before_forked_cooldowns_resumes_only_as_it_was_trained():
    # Saved before `cooldown` existed: its milestones were cooled inline, so step 200 ran at min_lr. Under today's
    # default (fork) the next update would be at the peak: refused in one line that says how to go on.
    old = saved_config(wsd(), 400, EVERY)
    del old["optimizer"]["cooldown"]
    forked = saved_config(wsd(cooldown="fork"), 600, EVERY)
    message = refusal(old, forked, 200)
    assert "optimizer.cooldown=inline" in message
    accepted(old, saved_config(wsd(), 600, EVERY), 200)
