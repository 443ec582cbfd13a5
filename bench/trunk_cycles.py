"""Growing the trunk on one GPU (#25.1): three schedules of the `small` preset, same data, seed and total steps.

  cosine_extended   cosine to N, then extended twice the way a user extends a cosine run today: resumed with a
                    larger max_steps and `optimizer.extended_from` (the old cycle ends there, the next re-warms,
                    logged); first the plain `max_steps` raise is tried and its one-line refusal recorded.
  wsd               a WSD trunk grown by raising max_steps N → 2N → 3N (`checkpoint.milestone_every=N`), its
                    milestones cooled off it (`optimizer.cooldown=fork`): the trunk holds the peak LR for good;
                    at M − D (D = decay_fraction·N, 1-sqrt) the trainer saves it, cools a copy into milestone M
                    over the same data, and goes on from the saved trunk. The milestone's validation loss is the
                    cooled model's (`cooldown/val_loss/all`); the trunk's own curve stays at the peak LR's.
  cosine_straight   cosine trained straight to 3N.

Each is `python -m genesis_model.train --config configs/train/small-cycles.yaml ... --resume auto`, one process
per invocation, the three schedules side by side on the one GPU (their start-up and compilation overlap the
others' steps). Validation loss is the trainer's own evaluation (`eval.every`, the same held-out batches of every
source, mean over sources = `all`), taken at every milestone N, 2N, 3N and in between for the curves.

Device command (one call on `nvidia-h200`, carry `.whl` and `runs/trunk-cycles-data`, ~41 MiB together; replace
<rev> with this checkout's `git rev-parse HEAD`, since the device's copy has no .git):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; export PYTHONUNBUFFERED=1 GENESIS_GIT_REV=<rev>; python3 bench/trunk_cycles.py --steps-per-cycle 320 --data runs/trunk-cycles-data --work /tmp/tc --out bench/results; rc=$?; cp bench/results/trunk_cycles.json bench/results/trunk_cycles.png /tmp/tc/logs.txt $OUT/; exit $rc

Expected: about 6–6.5 minutes at N = 320 with inline cool-downs (3 × 960 steps = 2,880 steps of 32,768 tokens at
≈ 15 steps/s of GPU time; 7 trainer processes and one refused extension, the first three compiling at once); the
forked cool-downs add 3 × 64 steps and three checkpoint reloads to `wsd` (not yet timed). `--time-budget-s` (530)
stops the runs and writes what there is.

`runs/trunk-cycles-data` (ignored by git) is the data kit's token shards, made beforehand on a machine with
`datasets` (the device has none) by `python bench/trunk_cycles.py --prepare-data --data runs/trunk-cycles-data`
(configs/corpus/data-kit.yaml; the intermediate stages are deleted after, leaving ~38 MiB of shards and tokenizer).

Writes `<out>/trunk_cycles.png` (validation loss of the three, milestones marked; LR below) and appends the run to
`<out>/trunk_cycles.json` (bench.common.append_run): top level `val_loss` per schedule and milestone,
`wsd_vs_straight_cosine`, `wsd_never_worse_than_extended`, `dpo_format_drop` (kept, null unless measured),
`gpu`, `command`, `git_rev`; the run holds the curves, events and per-invocation times. Re-running with the same
`--work` continues: finished invocations are skipped and a stopped one resumes from its newest milestone. The
script stops its runs (SIGTERM: they save) at `--time-budget-s` and writes what it has, marked incomplete.

CPU check of the whole flow (tiny model, synthetic data, N = 20, about 1–2 minutes on 2 cores):

    python bench/trunk_cycles.py --smoke --work /tmp/tc-smoke
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import append_run, describe_machine, environment, git_rev, write_json  # noqa: E402

CONFIG = REPO / "configs" / "train" / "small-cycles.yaml"
CORPUS = REPO / "configs" / "corpus" / "data-kit.yaml"
SCHEDULES = ("cosine_extended", "wsd", "cosine_straight")
CYCLES = 3
GOAL_RATIO = 1.005  # wsd's last milestone within 0.5% of straight cosine's final validation loss
# The CPU check: the tiny model on synthetic data, small enough for 2 cores.
SMOKE_OVERRIDES = ["model=tiny", "device=cpu", "micro_batch_size=4", "grad_accum_steps=1", "seq_len=128",
                   "log_every=1", "optimizer.lr=3.0e-3", "optimizer.min_lr=3.0e-4", "optimizer.warmup_steps=4",
                   "eval.batches_per_source=2", "eval.holdout_docs_per_source=8", "checkpoint.async_save=false",
                   "parallel.compile=false", "parallel.param_dtype=float32"]
SMOKE_VOCAB = 4096


class BenchError(Exception):
    """One line for the user; the script exits 1 with it."""


# ---------------------------------------------------------------------------------------------------------------
# Data


def prepare_data(data_dir: Path, workers: int) -> None:
    """The data kit's token shards (needs `datasets`, so not on the device); the intermediate stages (cleaned
    text, MinHash signatures, dedup lists) are dropped: the trainer reads the manifest, shards and tokenizer."""
    from data_prep.pipeline import prepare
    from data_prep.sources import CorpusConfig
    from genesis.config import load_config

    started = time.time()
    manifest = prepare(load_config(CorpusConfig, CORPUS, [f"workers={workers}"]), data_dir)
    for stage in ("clean", "sig", "dedup"):
        shutil.rmtree(data_dir / stage, ignore_errors=True)
    size = sum(path.stat().st_size for path in data_dir.rglob("*") if path.is_file())
    print(f"{data_dir}: {manifest.num_tokens:,} tokens, {size / 2**20:.1f} MiB, {time.time() - started:.0f} s")


def smoke_data(data_dir: Path) -> None:
    """Learnable synthetic shards for the CPU check: each token is the previous + 1, 2 or 3 (mod the vocab)."""
    import numpy as np

    from bench.common import write_synthetic_token_data

    if (data_dir / "manifest.json").is_file():
        return
    write_synthetic_token_data(
        data_dir, SMOKE_VOCAB, 300_000,
        lambda rng, length: 3 + (int(rng.integers(0, SMOKE_VOCAB)) + np.cumsum(rng.integers(1, 4, size=length)))
        % (SMOKE_VOCAB - 3),
        f"synthetic steps {SMOKE_VOCAB}")


# ---------------------------------------------------------------------------------------------------------------
# The invocations


@dataclass
class Plan:
    steps_per_cycle: int
    smoke: bool
    data: Path
    work: Path
    evals_per_cycle: int
    budget_s: float
    started: float = field(default_factory=time.time)

    @property
    def eval_every(self) -> int:
        return self.steps_per_cycle // self.evals_per_cycle

    @property
    def milestones(self) -> list[int]:
        return [self.steps_per_cycle * k for k in range(1, CYCLES + 1)]

    def base_overrides(self, schedule: str) -> list[str]:
        return [*(SMOKE_OVERRIDES if self.smoke else []), f"data_dir={self.data}", f"run_dir={self.work / schedule}",
                f"checkpoint.milestone_every={self.steps_per_cycle}", f"eval.every={self.eval_every}"]

    def invocations(self, schedule: str) -> list[list[str]]:
        """The overrides of each trainer invocation of `schedule`, in order."""
        if schedule == "cosine_extended":
            return [["optimizer.schedule=cosine", f"max_steps={m}",
                     f"optimizer.extended_from=[{','.join(str(e) for e in self.milestones[:k])}]"]
                    for k, m in enumerate(self.milestones)]
        if schedule == "wsd":
            return [["optimizer.schedule=wsd", "optimizer.cooldown=fork", f"max_steps={m}"] for m in self.milestones]
        return [["optimizer.schedule=cosine", f"max_steps={self.milestones[-1]}"]]

    def remaining_s(self) -> float:
        return self.budget_s - (time.time() - self.started)


def trainer_command(plan: Plan, schedule: str, overrides: list[str], resume: str = "auto") -> list[str]:
    return [sys.executable, "-m", "genesis_model.train", "--config", str(CONFIG), *plan.base_overrides(schedule),
            *overrides, "--resume", resume]


def child_env(plan: Plan) -> dict:
    threads = "1" if plan.smoke else str(max(1, (os.cpu_count() or 3) // len(SCHEDULES)))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return env


class Chain:
    """One schedule's invocations, run one after another in a thread; `stop()` ends the current one (SIGTERM:
    the trainer saves and exits)."""

    def __init__(self, plan: Plan, schedule: str, log):
        self.plan, self.schedule, self.log = plan, schedule, log
        self.run_dir = plan.work / schedule
        self.error: str | None = None
        self.invocations: list[dict] = []
        self.refusal: dict | None = None
        self._process: subprocess.Popen | None = None
        self._stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name=schedule, daemon=True)

    def stop(self) -> None:
        self._stopped.set()
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)

    def _latest(self) -> dict:
        from genesis.run_dir import RunDir

        return RunDir(self.run_dir).read_latest()

    def _call(self, command: list[str], label: str) -> tuple[int, str]:
        """Run one trainer process, its output into the log; (exit code, its last `error:` line or '')."""
        started = time.time()
        log_path = self.plan.work / f"{self.schedule}.{label}.log"  # appended to by a later call with this --work
        earlier = log_path.stat().st_size if log_path.is_file() else 0
        with open(log_path, "a") as handle:
            handle.write("$ " + " ".join(command) + "\n")
            handle.flush()
            self._process = subprocess.Popen(command, cwd=REPO, env=child_env(self.plan), stdout=handle,
                                             stderr=subprocess.STDOUT)
            if self._stopped.is_set():
                self._process.send_signal(signal.SIGTERM)
            try:
                code = self._process.wait()
            finally:
                if self._process.poll() is None:
                    self._process.kill()
        with open(log_path, "rb") as handle:
            text = handle.read()[earlier:].decode(errors="replace")
        errors = [line for line in text.splitlines() if line.startswith("error:")]
        self.log(f"{self.schedule} {label}: exit {code} after {time.time() - started:.0f} s")
        base = len(trainer_command(self.plan, self.schedule, [])) - 2  # up to "--resume"
        self.invocations.append({"label": label, "exit": code, "seconds": round(time.time() - started, 1),
                                 "args": command[base:]})
        return code, (errors[-1] if errors else "")

    def _probe_plain_extension(self, target: int) -> None:
        """A cosine run's max_steps raised with nothing else: the product must refuse it in one line (before
        anything is written; the probe's run_dir is a scratch one, so an acceptance could not touch the run)."""
        probe_file = self.run_dir / "plain_extension_probe.json"
        if probe_file.is_file():
            self.refusal = json.loads(probe_file.read_text())
            return
        from genesis.run_dir import latest_checkpoint

        checkpoint = latest_checkpoint(self.run_dir)
        overrides = ["optimizer.schedule=cosine", f"max_steps={target}", "optimizer.extended_from=[]",
                     f"run_dir={self.plan.work / 'plain_extension_probe'}"]
        command = [*trainer_command(self.plan, self.schedule, overrides, resume=str(checkpoint.path)),
                   "--stop-at-step", str(checkpoint.step + 1)]
        code, error = self._call(command, "plain_extension")
        self.refusal = {"max_steps": f"{checkpoint.step} → {target}", "exit": code, "refused": code == 2,
                        "message": error}
        write_json(probe_file, self.refusal)
        if code != 2:
            raise BenchError(f"raising a cosine run's max_steps without extended_from was not refused (exit {code})")

    def _run(self) -> None:
        try:
            for index, overrides in enumerate(self.plan.invocations(self.schedule)):
                target = int(next(o for o in overrides if o.startswith("max_steps=")).split("=")[1])
                latest = self._latest()
                if latest.get("status") == "completed" and latest.get("step", 0) >= target:
                    continue  # done by an earlier call with this --work
                if self._stopped.is_set():
                    return
                if self.schedule == "cosine_extended" and index == 1:
                    self._probe_plain_extension(target)
                code, error = self._call(trainer_command(self.plan, self.schedule, overrides), f"to_{target}")
                if code != 0:
                    if self._stopped.is_set():
                        return
                    log_path = self.plan.work / f"{self.schedule}.to_{target}.log"
                    raise BenchError(f"exit {code}: {error}" if error else f"exit {code} (see {log_path})")
        except BenchError as err:
            self.error = f"{self.schedule}: {err}"
        except Exception as err:  # noqa: BLE001 - reported in one line, the run goes on for the others
            self.error = f"{self.schedule}: {type(err).__name__}: {err}"


# ---------------------------------------------------------------------------------------------------------------
# Reading the runs


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows


def read_run(run_dir: Path) -> dict:
    """A schedule's curves from metrics.jsonl (the last row of each step: a resumed run rewrites the steps after
    its checkpoint) and its events. Rows of a milestone's cool-down off the trunk (`cooldown/...`, at the same
    step numbers as the trunk's) are kept apart: the milestone's validation loss is the cooled model's."""
    by_step: dict[int, dict] = {}
    cooled: dict[int, dict] = {}
    for row in read_jsonl(run_dir / "metrics.jsonl"):
        if isinstance(row.get("step"), int):
            if any(key.startswith("cooldown/") for key in row):
                cooled.setdefault(row["step"], {}).update(row)
            else:
                by_step[row["step"]] = row
    steps = sorted(by_step)
    val = {s: by_step[s]["val_loss/all"] for s in steps if "val_loss/all" in by_step[s]}
    val_sources = {s: {k.split("/", 1)[1]: round(v, 5) for k, v in by_step[s].items() if k.startswith("val_loss/")}
                   for s in steps if "val_loss/all" in by_step[s]}
    events = [row for row in read_jsonl(run_dir / "events.jsonl")
              if row.get("event") in ("lr_rewarm", "loss_spike", "nonfinite_step_skipped", "resumed",
                                      "checkpoint_withheld", "rolled_back", "run_finished", "cooldown_started",
                                      "cooldown_finished")]
    latest = json.loads((run_dir / "latest.json").read_text()) if (run_dir / "latest.json").is_file() else {}
    return {
        "train_loss": [[s, round(by_step[s]["loss"], 5)] for s in steps if "loss" in by_step[s]],
        "lr": [[s, by_step[s]["lr"]] for s in steps if "lr" in by_step[s]],
        "val_loss": [[s, round(v, 5)] for s, v in val.items()],
        "val_loss_by_source": val_sources,
        "milestone_val_loss": {str(s): round(row["cooldown/val_loss/all"], 5) for s, row in sorted(cooled.items())
                               if "cooldown/val_loss/all" in row},
        "cooldown_lr": [[s, row["cooldown/lr"]] for s, row in sorted(cooled.items()) if "cooldown/lr" in row],
        "cooldown_train_loss": [[s, round(row["cooldown/loss"], 5)] for s, row in sorted(cooled.items())
                                if "cooldown/loss" in row],
        "events": [{k: v for k, v in row.items() if k not in ("time", "path")} for row in events],
        "health": latest.get("health"),
        "repetition": latest.get("repetition"),
        "last_step": latest.get("step"),
        "status": latest.get("status"),
    }


def extension_check(run: dict, boundary: int, window: int) -> dict:
    """Around a cycle boundary (a re-warm): the mean logged training loss over the `window` steps before it, the
    largest over the `window` after, and the spike / non-finite events the trainer logged in that window."""
    before = [loss for step, loss in run["train_loss"] if boundary - window < step <= boundary]
    after = [loss for step, loss in run["train_loss"] if boundary < step <= boundary + window]
    spikes = [e for e in run["events"] if e.get("event") in ("loss_spike", "nonfinite_step_skipped")
              and boundary < e.get("step", -1) <= boundary + window]
    rewarm = [e for e in run["events"] if e.get("event") == "lr_rewarm" and e.get("step") == boundary]
    if not before or not after:
        return {"boundary": boundary, "measured": False}
    mean_before = sum(before) / len(before)
    return {"boundary": boundary, "measured": True, "train_loss_mean_before": round(mean_before, 4),
            "train_loss_max_after": round(max(after), 4),
            "max_after_over_mean_before": round(max(after) / mean_before, 4),
            "spike_events": len(spikes), "lr_rewarm_logged": bool(rewarm),
            "lr_rewarm": {k: rewarm[0][k] for k in ("from_lr", "to_lr", "steps")} if rewarm else None}


def summarize(plan: Plan, runs: dict[str, dict]) -> dict:
    """The top-level figures of the issue from the three runs (None where a run did not reach a milestone)."""
    val_loss = {}
    for schedule, run in runs.items():
        at = {**{str(s): v for s, v in run["val_loss"]}, **run.get("milestone_val_loss", {})}  # cooled, if any
        val_loss[schedule] = {str(m): at.get(str(m)) for m in plan.milestones}
    last = str(plan.milestones[-1])
    wsd, straight = val_loss.get("wsd", {}), val_loss.get("cosine_straight", {})
    extended = val_loss.get("cosine_extended", {})
    ratio = (wsd[last] / straight[last]) if wsd.get(last) and straight.get(last) else None
    pairs = [(wsd.get(str(m)), extended.get(str(m))) for m in plan.milestones]
    never_worse = all(w <= e for w, e in pairs) if all(w is not None and e is not None for w, e in pairs) else None
    window = max(1, plan.steps_per_cycle // 8)
    extensions = {schedule: [extension_check(runs[schedule], b, window) for b in plan.milestones[:-1]]
                  for schedule in ("cosine_extended", "wsd") if schedule in runs}
    checks = [check for per_schedule in extensions.values() for check in per_schedule]
    spike_free = (all(check["spike_events"] == 0 for check in checks)
                  if len(extensions) == 2 and all(check["measured"] for check in checks) else None)
    return {"val_loss": val_loss, "wsd_vs_straight_cosine": round(ratio, 5) if ratio else None,
            "wsd_never_worse_than_extended": never_worse,
            "goal": {"wsd_within_0.5pct_of_straight": (ratio <= GOAL_RATIO) if ratio else None,
                     "wsd_never_worse_than_extended": never_worse,
                     "no_spike_at_extension": spike_free},
            "extensions": extensions}


# ---------------------------------------------------------------------------------------------------------------
# The plot


SCHEDULE_STYLE = {"cosine_extended": ("cosine to N, extended twice (extended_from, re-warm)", "tab:red"),
                  "wsd": ("WSD trunk at peak LR; ◆ its milestones, each cooled off it", "tab:blue"),
                  "cosine_straight": ("cosine straight to 3N", "tab:gray")}


def plot(plan: Plan, runs: dict[str, dict], summary: dict, out: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (val_axis, train_axis, lr_axis) = plt.subplots(3, 1, figsize=(10, 11), sharex=True,
                                                           height_ratios=[3, 2, 1])
    for schedule, run in runs.items():
        label, color = SCHEDULE_STYLE[schedule]
        if run["val_loss"]:
            val_axis.plot(*zip(*run["val_loss"]), color=color, marker="o", markersize=2.5, linewidth=1.3, label=label)
        at = summary["val_loss"][schedule]
        marks = [(int(m), v) for m, v in at.items() if v is not None]
        if marks:
            val_axis.scatter(*zip(*marks), color=color, marker="D", s=45, zorder=5, edgecolors="black")
            for m, v in marks:
                val_axis.annotate(f"{v:.3f}", (m, v), textcoords="offset points", xytext=(4, 6), fontsize=7,
                                  color=color)
        if run["train_loss"]:
            steps, losses = zip(*run["train_loss"])
            train_axis.plot(steps, losses, color=color, linewidth=0.8, alpha=0.85, label=schedule)
        if run["lr"]:
            lr_axis.plot(*zip(*run["lr"]), color=color, linewidth=1.1)
        for m in plan.milestones:  # each milestone's cool-down, dashed, ending at min_lr on the milestone
            segment = [(s, lr) for s, lr in run.get("cooldown_lr", []) if m - plan.steps_per_cycle < s <= m]
            if segment:
                lr_axis.plot(*zip(*segment), color=color, linewidth=1.1, linestyle="--")
        if run.get("cooldown_train_loss"):
            train_axis.scatter(*zip(*run["cooldown_train_loss"]), color=color, s=3, marker="x", alpha=0.7)
    for axis in (val_axis, train_axis, lr_axis):
        for m in plan.milestones:
            axis.axvline(m, color="black", linestyle=":", linewidth=0.8, alpha=0.6)
        axis.grid(alpha=0.3)
    ratio = summary["wsd_vs_straight_cosine"]
    val_axis.set_title(title + (f"\nWSD at 3N / straight cosine: {ratio:.4f} (goal ≤ {GOAL_RATIO}); WSD ≤ extended "
                                f"cosine at every milestone: {summary['wsd_never_worse_than_extended']}"
                                if ratio else ""), fontsize=9)
    val_axis.set_ylabel("validation loss (mean of sources)")
    val_axis.legend(fontsize=8)
    train_axis.set_ylabel("training loss (logged steps)")
    lows = [loss for run in runs.values() for _, loss in run["train_loss"][len(run["train_loss"]) // 10:]]
    if lows:  # the warm-up's first losses would flatten the rest
        train_axis.set_ylim(min(lows) - 0.1, max(lows) + 0.1)
    lr_axis.set_ylabel("learning rate")
    lr_axis.set_xlabel(f"step (N = {plan.steps_per_cycle}; dotted: milestones N, 2N, 3N)")
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp.png")
    figure.savefig(tmp, dpi=110)
    plt.close(figure)
    os.replace(tmp, out)
    return out


# ---------------------------------------------------------------------------------------------------------------


def check_plan(plan: Plan) -> None:
    """Every refusal before anything runs, in one line each."""
    if plan.steps_per_cycle % plan.evals_per_cycle:
        raise BenchError(f"--steps-per-cycle {plan.steps_per_cycle} is not a multiple of --evals-per-cycle "
                         f"{plan.evals_per_cycle}")
    log_every = 1 if plan.smoke else 10
    if plan.eval_every % log_every:
        raise BenchError(f"eval every {plan.eval_every} steps is not a multiple of log_every {log_every}: validation "
                         f"loss would not be logged; pick N so that N/{plan.evals_per_cycle} is a multiple of "
                         f"{log_every}")
    if not plan.smoke:
        if not (plan.data / "manifest.json").is_file():
            raise BenchError(f"{plan.data}: no prepared data (manifest.json); make it where `datasets` is installed "
                             f"with `python bench/trunk_cycles.py --prepare-data --data {plan.data}` and carry it")
        import torch

        if not torch.cuda.is_available():
            raise BenchError("no CUDA device; the measurement runs on one GPU (use --smoke for the CPU check)")
    plan_file = plan.work / "plan.json"
    wanted = {"steps_per_cycle": plan.steps_per_cycle, "smoke": plan.smoke, "data": str(plan.data),
              "evals_per_cycle": plan.evals_per_cycle}
    if plan_file.is_file() and json.loads(plan_file.read_text()) != wanted:
        raise BenchError(f"{plan.work} holds runs of another plan ({json.dumps(json.loads(plan_file.read_text()))}); "
                         f"use another --work or delete it")
    plan.work.mkdir(parents=True, exist_ok=True)
    write_json(plan_file, wanted)


def run_all(plan: Plan, schedules: list[str]) -> tuple[dict[str, Chain], float]:
    lock = threading.Lock()
    log_file = open(plan.work / "progress.log", "a", buffering=1)

    def log(message: str) -> None:
        line = f"[{time.time() - plan.started:6.0f} s] {message}"
        with lock:
            print(line, flush=True)
            log_file.write(line + "\n")

    chains = {schedule: Chain(plan, schedule, log) for schedule in schedules}
    started = time.time()
    for chain in chains.values():
        chain.thread.start()
    deadline_hit = False
    while any(chain.thread.is_alive() for chain in chains.values()):
        time.sleep(1.0)
        if not deadline_hit and plan.remaining_s() <= 0:
            deadline_hit = True
            log(f"time budget ({plan.budget_s:.0f} s) spent: stopping the runs (they save), writing what there is")
            for chain in chains.values():
                chain.stop()
        if deadline_hit and plan.remaining_s() < -30:
            break  # a run that has not stopped 30 s after its SIGTERM is left behind (the call's end kills it)
    log_file.close()
    return chains, time.time() - started


def gather_logs(plan: Plan) -> None:
    """Every invocation's log, one after another, in <work>/logs.txt (one file to bring back)."""
    with open(plan.work / "logs.txt", "w") as out:
        for path in sorted(plan.work.glob("*.log")):
            out.write(f"===== {path.name}\n{path.read_text(errors='replace')}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps-per-cycle", type=int, default=None, help="N (default 320; 20 with --smoke)")
    parser.add_argument("--out", type=Path, default=None,
                        help="where trunk_cycles.json (appended) and trunk_cycles.png go (default bench/results; "
                             "<work>/results with --smoke)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/trunk_cycles"), help="run directories and logs")
    parser.add_argument("--data", type=Path, default=REPO / "runs" / "trunk-cycles-data",
                        help="prepared data kit shards (made by --prepare-data)")
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU, synthetic data: checks the flow")
    parser.add_argument("--evals-per-cycle", type=int, default=None,
                        help="validations per cycle (default 8; 4 with --smoke)")
    parser.add_argument("--schedules", default=",".join(SCHEDULES), help="a subset, for a partial check")
    parser.add_argument("--time-budget-s", type=float, default=530.0,
                        help="stop the runs (they save) and write what there is after this long")
    parser.add_argument("--prepare-data", action="store_true", help="only make --data from the data kit, then exit")
    parser.add_argument("--workers", type=int, default=2, help="--prepare-data: worker processes")
    args = parser.parse_args(argv)
    if args.prepare_data:
        prepare_data(args.data, args.workers)
        return 0

    smoke = args.smoke
    work = args.work.resolve()
    plan = Plan(steps_per_cycle=args.steps_per_cycle or (20 if smoke else 320), smoke=smoke,
                data=(work / "data") if smoke else args.data.resolve(), work=work,
                evals_per_cycle=args.evals_per_cycle or (4 if smoke else 8), budget_s=args.time_budget_s)
    out = (args.out or ((work / "results") if smoke else REPO / "bench" / "results")).resolve()
    schedules = [s for s in args.schedules.split(",") if s]
    try:
        unknown = set(schedules) - set(SCHEDULES)
        if unknown:
            raise BenchError(f"--schedules: unknown {sorted(unknown)}; choose from {', '.join(SCHEDULES)}")
        check_plan(plan)
        if smoke:
            smoke_data(plan.data)
    except BenchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1

    print(f"trunk cycles: N={plan.steps_per_cycle}, {CYCLES} cycles, schedules {', '.join(schedules)}, "
          f"work {work}", flush=True)
    chains, wall = run_all(plan, schedules)
    gather_logs(plan)
    runs = {schedule: read_run(work / schedule) for schedule in schedules}
    summary = summarize(plan, runs)
    errors = [chain.error for chain in chains.values() if chain.error]
    complete = not errors and all(runs[s]["last_step"] == plan.milestones[-1] and runs[s]["status"] == "completed"
                                  for s in schedules)
    command = "python bench/trunk_cycles.py " + " ".join(sys.argv[1:] if argv is None else argv)
    model = "tiny model on CPU (smoke)" if smoke else "`small` preset"
    title = f"Trunk cycles, {model}: {CYCLES} × {plan.steps_per_cycle} steps, {describe_machine()}"
    png = plot(plan, runs, summary, out / "trunk_cycles.png", title)

    json_path = out / "trunk_cycles.json"
    existing = json.loads(json_path.read_text()) if json_path.is_file() else {}
    top = {"val_loss": summary["val_loss"], "wsd_vs_straight_cosine": summary["wsd_vs_straight_cosine"],
           "wsd_never_worse_than_extended": summary["wsd_never_worse_than_extended"],
           "dpo_format_drop": existing.get("dpo_format_drop"),  # measured by the DPO work (#25.4), kept
           "gpu": describe_machine(), "command": command, "git_rev": git_rev()}
    run = {**environment(), **top, "complete": complete, "errors": errors, "smoke": smoke,
           "steps_per_cycle": plan.steps_per_cycle, "cycles": CYCLES, "milestones": plan.milestones,
           "config": str(CONFIG.relative_to(REPO)), "overrides": {s: plan.invocations(s) for s in schedules},
           "base_overrides": plan.base_overrides("<schedule>"), "data": str(plan.data),
           "goal": summary["goal"], "extensions": summary["extensions"],
           "plain_cosine_extension": chains["cosine_extended"].refusal if "cosine_extended" in chains else None,
           "invocations": {s: c.invocations for s, c in chains.items()}, "wall_s": round(wall, 1),
           "note": "the three schedules ran side by side on one GPU, so per-run speeds are not single-run speeds",
           "curves": runs}
    # An incomplete run is kept in `runs` but leaves the top-level figures of an earlier complete one alone.
    append_run(json_path, run, top if complete or existing.get("val_loss") is None else {})
    for schedule in schedules:
        at = summary["val_loss"][schedule]
        print(f"{schedule:>16}: " + "  ".join(f"{m}: {v:.4f}" if v is not None else f"{m}: -" for m, v in at.items()))
    print(json.dumps({k: summary[k] for k in ("wsd_vs_straight_cosine", "wsd_never_worse_than_extended", "goal")}))
    print(f"wrote {json_path} and {png} ({wall:.0f} s)")
    if not complete:
        print("error: " + ("; ".join(errors) if errors else "incomplete (time budget): the record says complete=false"),
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
