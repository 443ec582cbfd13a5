"""Checkpoint saving and resuming of genesis-1b on one GPU, in the steady state, against the previous code path.

Runs the real entry point (`torchrun -m genesis_model.train`, configs/train/genesis-1b-h100.yaml, micro-batch 8)
on synthetic token shards:
  async   saves every `--save-every` steps (spaced so that saves do not overlap), several of them: the
          steady state is every save after the first;
  resume  of that run: process launch → first resumed step logged (verification included), with the first
          step's time (compilation) and the load's verify/read seconds reported separately;
  anchor  the same async run and resume with the code of `--anchor` (a source tree of an earlier revision),
          in the same call.

    python bench/checkpoint.py --workdir /tmp/ckbench --anchor bench/.anchor

Appends the run to bench/results/checkpoint.json (`runs`) and sets the top-level figures of the latest call.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import append_run, environment, git_rev, write_synthetic_token_data  # noqa: E402
from genesis.run_dir import MetricsReader, RunDir  # noqa: E402

CONFIG = Path("configs") / "train" / "genesis-1b-h100.yaml"
MICRO_BATCH = 8


def make_data(data_dir: Path, tokens: int) -> None:
    write_synthetic_token_data(data_dir, 49152, tokens, lambda rng, length: rng.integers(4, 49152, size=length),
                               "synthetic 49152")


def data_for_old_code(data_dir: Path, target: Path) -> Path:
    """The same shards under a manifest without the fields added since (older code refuses unknown fields)."""
    target.mkdir(parents=True, exist_ok=True)
    for item in data_dir.iterdir():
        if item.name != "manifest.json" and not (target / item.name).exists():
            (target / item.name).symlink_to(item.resolve())
    manifest = json.loads((data_dir / "manifest.json").read_text())
    for source in manifest["sources"]:
        for shard in source["shards"]:
            shard.pop("max_token_id", None)
    (target / "manifest.json").write_text(json.dumps(manifest))
    return target


def disk_write_gb_s(directory: Path, threads: int = 8, gib_per_thread: int = 1) -> float:
    """What the disk takes: `threads` files of `gib_per_thread` GiB written at once and fsynced (the bound for a
    checkpoint's write)."""
    from concurrent.futures import ThreadPoolExecutor

    directory.mkdir(parents=True, exist_ok=True)
    block = os.urandom(1 << 26)

    def write(index: int) -> None:
        with open(directory / f"probe-{index}", "wb") as handle:
            for _ in range(gib_per_thread * 16):
                handle.write(block)
            handle.flush()
            os.fsync(handle.fileno())

    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(write, range(threads)))
    seconds = time.perf_counter() - started
    shutil.rmtree(directory)
    return round(threads * gib_per_thread * 2**30 / 1e9 / seconds, 3)


def command_for(tree: Path, run_dir: Path, data_dir: Path, overrides: list[str], resume: bool) -> list[str]:
    """The torchrun command of the trainer in source tree `tree` (this one or the anchor)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "-m",
            "genesis_model.train", "--config", str(tree / CONFIG), f"data_dir={data_dir}", f"run_dir={run_dir}",
            f"micro_batch_size={MICRO_BATCH}", "grad_accum_steps=1", "eval.every=0", "log_every=1",
            "verify_data_checksums=false", *overrides, *(["--resume", "auto"] if resume else [])]


def env_for(tree: Path, workdir: Path) -> dict:
    # One inductor cache for every run: the anchor and the current model compile to the same graphs.
    pythonpath = os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH", "")]))
    return {**os.environ, "PYTHONPATH": pythonpath, "TORCHINDUCTOR_CACHE_DIR": str(workdir / "inductor")}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def train(tree: Path, workdir: Path, run_dir: Path, data_dir: Path, overrides: list[str]) -> tuple[list[dict], list[dict]]:
    result = subprocess.run(command_for(tree, run_dir, data_dir, overrides, False), cwd=tree, capture_output=True,
                            text=True, env=env_for(tree, workdir))
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    return MetricsReader(RunDir(run_dir).metrics).all_rows(), read_jsonl(RunDir(run_dir).events)


def save_figures(events: list[dict], checkpoint: Path) -> dict:
    """Blocked seconds per save (the save call + the wait for staging before the next optimizer step), seconds
    from the save call to the checkpoint complete on disk with its marker, and the rate that makes."""
    calls = [e["seconds"] for e in events if e["event"] == "checkpoint_blocked"]
    staging = [e["seconds"] for e in events if e["event"] == "checkpoint_staging_wait"]
    staging += [0.0] * (len(calls) - len(staging))
    blocked = [round(c + s, 3) for c, s in zip(calls, staging)]
    saved = [e for e in events if e["event"] == "checkpoint_saved"]
    complete = [e["seconds"] for e in saved]
    size = sum(p.stat().st_size for p in checkpoint.rglob("*") if p.is_file())
    steady_complete = statistics.median(complete[1:] or complete)
    return {
        "blocked_s_each": blocked,
        "staged_s_each": [e.get("staged_s") for e in saved],
        "written_s_each": [e.get("written_s") for e in saved],
        "save_complete_s_each": complete,
        "steady_blocked_s": round(statistics.median(blocked[1:] or blocked), 3),
        "save_complete_s": round(steady_complete, 3),
        "checkpoint_gib": round(size / 2**30, 3),
        "save_gb_s": round(size / 1e9 / steady_complete, 3),
    }


def time_resume(tree: Path, workdir: Path, run_dir: Path, data_dir: Path, first_new_step: int) -> dict:
    """Process launch → the first resumed step logged; that step's own time (it compiles) and what the load
    spent verifying and reading, from the trainer's `resumed` event (absent in older code)."""
    started = time.monotonic()
    process = subprocess.Popen(command_for(tree, run_dir, data_dir, [f"max_steps={first_new_step + 1}",
                                                                    "checkpoint.save_every=0",
                                                                    "checkpoint.save_at_end=false"], True),
                               cwd=tree, env=env_for(tree, workdir), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    reader = MetricsReader(RunDir(run_dir).metrics)
    while process.poll() is None:
        rows = [m for m in reader.all_rows() if m["step"] == first_new_step]
        if rows:
            elapsed = time.monotonic() - started
            process.wait()
            resumed = [e for e in read_jsonl(RunDir(run_dir).events) if e["event"] == "resumed"][-1]
            first_step = rows[-1]["step_time_s"]
            return {"resume_s": round(elapsed, 1), "first_step_s": round(first_step, 1),
                    "resume_s_without_first_step": round(elapsed - first_step, 1),
                    "verify_s": resumed.get("verify_s"), "read_s": resumed.get("read_s")}
        time.sleep(0.05)
    raise RuntimeError(process.stderr.read()[-3000:])


def async_run(tree: Path, workdir: Path, data_dir: Path, name: str, saves: int, save_every: int,
              extra: list[str] = ()) -> dict:
    run_dir = workdir / name
    steps = saves * save_every
    overrides = [f"max_steps={steps}", f"checkpoint.save_every={save_every}", "checkpoint.milestone_every=0",
                 "checkpoint.keep_last=1", "checkpoint.async_save=true", "checkpoint.save_at_end=false", *extra]
    metrics, events = train(tree, workdir, run_dir, data_dir, overrides)
    checkpoint = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    figures = save_figures(events, checkpoint)
    steady = [m["tokens_per_s"] for m in metrics if m["step"] % save_every not in (0, 1) and m["step"] >= 4]
    figures["trainer_tok_s"] = round(statistics.median(steady), 1)
    figures |= time_resume(tree, workdir, run_dir, data_dir, steps + 1)
    shutil.rmtree(run_dir)  # 12 GB per checkpoint; the device's disk is 64 GB
    return figures


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/ckbench"))
    parser.add_argument("--anchor", type=Path, default=None, help="source tree of the previous code path")
    parser.add_argument("--anchor-rev", default=None)
    parser.add_argument("--save-every", type=int, default=60, help="steps between saves (~0.2 s a step)")
    parser.add_argument("--saves", type=int, default=4)
    parser.add_argument("--writer-threads", type=int, nargs="*", default=[],
                        help="also run with these checkpoint.writer_threads (the default run uses the config's)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "checkpoint.json")
    parser.add_argument("--anchor-budget-s", type=float, default=1e9,
                        help="run the anchor only if the call is younger than this (a device call is capped)")
    args = parser.parse_args()
    call_started = time.monotonic()
    import torch

    data_dir = args.workdir / "data"
    make_data(data_dir, tokens=(args.saves * args.save_every + 8) * MICRO_BATCH * 2049)
    run = {**environment(), "git_rev": git_rev(), "command": " ".join(sys.argv), "gpu": torch.cuda.get_device_name(0),
           "micro_batch": MICRO_BATCH, "save_every": args.save_every}

    run["disk_write_gb_s"] = disk_write_gb_s(args.workdir / "probe")
    print("disk", run["disk_write_gb_s"], flush=True)
    current = async_run(REPO, args.workdir, data_dir, "async", args.saves, args.save_every)
    run["current"] = current
    print(json.dumps(current), flush=True)
    for threads in args.writer_threads:
        run[f"current_writer_threads_{threads}"] = async_run(REPO, args.workdir, data_dir, f"async-{threads}", 3,
                                                             args.save_every, [f"checkpoint.writer_threads={threads}"])
        print(threads, json.dumps(run[f"current_writer_threads_{threads}"]), flush=True)
    latest = {key: current[key] for key in ("steady_blocked_s", "save_complete_s", "save_gb_s", "resume_s")}
    latest |= {"resume_first_step_s": current["first_step_s"], "gpu": run["gpu"], "command": run["command"],
               "git_rev": run["git_rev"]}
    append_run(args.out, run, latest)  # kept even if the anchor below runs out of time
    if args.anchor and time.monotonic() - call_started > args.anchor_budget_s:
        run["anchor"] = {"git_rev": args.anchor_rev, "skipped": "not enough of the call's time left"}
    elif args.anchor:
        try:
            run["anchor"] = {"git_rev": args.anchor_rev,
                             **async_run(args.anchor.resolve(), args.workdir,
                                        data_for_old_code(data_dir, args.workdir / "data-old"), "anchor", 2,
                                        args.save_every)}
        except Exception as err:  # noqa: BLE001 - the current figures are kept whatever the anchor does
            run["anchor"] = {"git_rev": args.anchor_rev, "error": str(err)[-1500:]}
        print(json.dumps(run["anchor"]), flush=True)
        data = json.loads(args.out.read_text())
        data["runs"][-1] = run  # this call's own entry, now with its anchor
        args.out.write_text(json.dumps(data, indent=2))
    print(json.dumps(latest, indent=1))


if __name__ == "__main__":
    main()
