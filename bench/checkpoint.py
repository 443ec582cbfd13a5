"""Checkpoint saving and resuming of genesis-1b on one GPU, in the steady state, against the previous code path.

Runs the real entry point (`torchrun -m genesis_model.train`, configs/train/genesis-1b-h100.yaml, micro-batch 8)
on synthetic token shards:
  async   saves every `--save-every` steps (spaced so that saves do not overlap), several of them: the
          steady state is every save after the first;
  resume  of that run: process launch → first resumed step logged (verification included), with the first
          step's time (compilation) and the load's verify/read seconds reported separately;
  anchor  the same async run and resume with the code of `--anchor` (a source tree of an earlier revision),
          in the same call; or, cheaper, `--resume-anchor`: the earlier code resumes this run's checkpoint
          (same files, same compile cache), after the current code did;
  cold    `--cold-resume`: the current code resumes once more with the checkpoint's files dropped from the page
          cache (posix_fadvise DONTNEED), so verification reads them from the disk.

Every trainer process is launched through bench/compile_probe.py, which records when the process started, when
its imports were done, and what torch.compile did (cache hits, seconds per phase): a resume is split into
launcher, imports, build, verification, reading (preparing the state dicts, DCP's read, applying them), and the
first step (compilation), with the compile counters beside it.

    python bench/checkpoint.py --workdir /tmp/ckbench --anchor bench/.anchor
    python bench/checkpoint.py --workdir /tmp/ckbench --saves 2 --resume-anchor bench/.anchor --cold-resume

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

from bench.common import CallRecord, append_run, environment, git_rev, write_synthetic_token_data  # noqa: E402
from genesis.run_dir import MetricsReader, RunDir  # noqa: E402

CONFIG = Path("configs") / "train" / "genesis-1b-h100.yaml"
MICRO_BATCH = 8
PROBE = REPO / "bench" / "compile_probe.py"


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


def disk_read_gb_s(directory: Path, threads: int = 8, gib_per_thread: int = 1) -> float:
    """What the disk gives back: `threads` files of `gib_per_thread` GiB written and fsynced, dropped from the page
    cache, then read at once in 16 MiB reads (the bound for reading a checkpoint that is not cached)."""
    from concurrent.futures import ThreadPoolExecutor

    directory.mkdir(parents=True, exist_ok=True)
    block = os.urandom(1 << 26)
    for index in range(threads):
        with open(directory / f"probe-{index}", "wb") as handle:
            for _ in range(gib_per_thread * 16):
                handle.write(block)
            handle.flush()
            os.fsync(handle.fileno())
    drop_from_page_cache(directory)

    def read(index: int) -> None:
        with open(directory / f"probe-{index}", "rb", buffering=0) as handle:
            while handle.read(1 << 24):
                pass

    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(read, range(threads)))
    seconds = time.perf_counter() - started
    shutil.rmtree(directory)
    return round(threads * gib_per_thread * 2**30 / 1e9 / seconds, 3)


def drop_from_page_cache(directory: Path) -> None:
    """Evict the (clean, fsynced) files under `directory` from the page cache: the next read comes from the disk."""
    for file in directory.rglob("*"):
        if file.is_file():
            fd = os.open(file, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def reader_check(directory: Path) -> dict:
    """DCP's read path alone, in this process, on the GPU: a ~2 GiB state dict (genesis-1b-sized matrices, one
    400 MB tensor, bf16 tensors, CPU step counters, pickled hyper-parameters) saved with HashingWriter, then read
    into GPU tensors by torch's FileSystemReader (DCP's own path), by SafeReader with the files in the page cache,
    and by SafeReader with them dropped from it; every read must give back the saved tensors bit for bit."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    from genesis_model.checkpoint_io import HashingWriter, SafeLoadPlanner, SafeReader

    shutil.rmtree(directory, ignore_errors=True)
    generator = torch.Generator(device="cuda").manual_seed(0)
    state = {"embedding": torch.randn(49152 * 2048, device="cuda", generator=generator)}
    state |= {f"w{i}": torch.randn(2048, 5632, device="cuda", generator=generator) for i in range(30)}
    state |= {f"b{i}": torch.randn(2048, 2048, device="cuda", generator=generator).bfloat16() for i in range(8)}
    state |= {f"step{i}": torch.tensor(float(i)) for i in range(8)}
    state["hyper"] = {"lr": 3e-4, "betas": (0.9, 0.95)}
    size = sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor))
    dcp.save(state, storage_writer=HashingWriter(directory, 8), no_dist=True)
    result = {"gb": round(size / 1e9, 3)}

    def read(name: str, reader) -> None:
        target = {k: torch.empty_like(v) if isinstance(v, torch.Tensor) else {"lr": 0.0, "betas": (0.0, 0.0)}
                  for k, v in state.items()}
        torch.cuda.synchronize()
        started = time.perf_counter()
        dcp.load(target, storage_reader=reader, planner=SafeLoadPlanner(), no_dist=True)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        equal = all(torch.equal(target[k], v) if isinstance(v, torch.Tensor) else target[k] == v
                    for k, v in state.items())
        result[name] = {"s": round(seconds, 3), "gb_s": round(size / 1e9 / seconds, 3), "equal": equal}

    read("dcp_filesystem_reader", FileSystemReader(str(directory)))
    read("safe_reader_cached", SafeReader(directory))
    drop_from_page_cache(directory)
    read("safe_reader_from_disk", SafeReader(directory))
    shutil.rmtree(directory)
    del state
    torch.cuda.empty_cache()
    return result


def command_for(tree: Path, run_dir: Path, data_dir: Path, overrides: list[str], resume: bool,
                extra: tuple[str, ...] = ()) -> list[str]:
    """The torchrun command of the trainer in source tree `tree` (this one or the anchor), through the probe."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", str(PROBE),
            "--config", str(tree / CONFIG), f"data_dir={data_dir}", f"run_dir={run_dir}",
            f"micro_batch_size={MICRO_BATCH}", "grad_accum_steps=1", "eval.every=0", "log_every=1",
            "verify_data_checksums=false", *overrides, *(["--resume", "auto"] if resume else []), *extra]


def env_for(tree: Path, workdir: Path, stats: Path | None = None, eager: bool = False,
            extra_env: dict | None = None) -> dict:
    # One inductor cache for every run: the anchor and the current model compile to the same graphs.
    pythonpath = os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH", "")]))
    env = {**os.environ, "PYTHONPATH": pythonpath, "TORCHINDUCTOR_CACHE_DIR": str(workdir / "inductor"),
           **(extra_env or {})}
    if stats is not None:
        env["GENESIS_COMPILE_STATS"] = str(stats)
    if eager:
        env["TORCH_COMPILE_DISABLE"] = "1"  # every torch.compile'd function runs eagerly
    return env


def compile_summary(stats_file: Path) -> dict:
    """The probe's record, boiled down: cache hits and misses, Dynamo frames compiled, seconds per phase."""
    if not stats_file.is_file():
        return {}
    stats = json.loads(stats_file.read_text())
    counters = stats.get("counters", {})
    wanted = {"inductor": ("fxgraph_cache_hit", "fxgraph_cache_miss", "fxgraph_cache_bypass"),
              "aot_autograd": ("autograd_cache_hit", "autograd_cache_miss", "autograd_cache_bypass"),
              "stats": ("unique_graphs", "calls_captured"), "frames": ("total", "ok")}
    summary = {f"{group}.{key}": counters.get(group, {}).get(key) for group, keys in wanted.items() for key in keys}
    summary = {key: value for key, value in summary.items() if value is not None}
    phases = stats.get("compile_phase_s", {})
    top = sorted(phases.items(), key=lambda item: -item[1][0])[:12]
    frames = [{key: row.get(key) for key in ("co_name", "entire_frame_compile_time_s", "backend_compile_time_s",
                                               "inductor_compile_time_s", "code_gen_time_s", "graph_op_count",
                                               "cache_size", "fail_type") if row.get(key) is not None}
              for row in stats.get("frames", [])]
    return {"process_started": stats.get("process_started"), "imported": stats.get("imported"),
            "counters": summary, "phase_s": dict(top), "frames": frames, "error": stats.get("error")}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def train(tree: Path, workdir: Path, run_dir: Path, data_dir: Path, overrides: list[str],
          extra: tuple[str, ...] = ()) -> tuple[list[dict], list[dict], dict]:
    stats = workdir / f"compile-{run_dir.name}-train.json"
    result = subprocess.run(command_for(tree, run_dir, data_dir, overrides, False, extra), cwd=tree,
                            capture_output=True, text=True, env=env_for(tree, workdir, stats))
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    return MetricsReader(RunDir(run_dir).metrics).all_rows(), read_jsonl(RunDir(run_dir).events), compile_summary(stats)


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


def time_resume(tree: Path, workdir: Path, run_dir: Path, data_dir: Path, first_new_step: int, label: str = "resume",
                cold: bool = False, extra_env: dict | None = None) -> dict:
    """Process launch → the first resumed step logged; that step's own time (it compiles) and what the load
    spent verifying and reading, from the trainer's `resumed` event (absent in older code), and the rest split
    by the probe's timestamps: launcher (torchrun until the trainer's interpreter runs), imports, build (process
    group, checks, model and optimizer, until the load starts), after_load (until the first step starts).
    Several resumes of one run each wait for a step row of their own. `cold`: the checkpoint's files are
    dropped from the page cache first."""
    checkpoint = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    if cold:
        drop_from_page_cache(checkpoint)
    reader = MetricsReader(RunDir(run_dir).metrics)
    seen = sum(1 for m in reader.all_rows() if m["step"] == first_new_step)
    stats = workdir / f"compile-{run_dir.name}-{label}.json"
    stats.unlink(missing_ok=True)
    launched = time.time()
    started = time.monotonic()
    process = subprocess.Popen(command_for(tree, run_dir, data_dir, [f"max_steps={first_new_step + 1}",
                                                                    "checkpoint.save_every=0",
                                                                    "checkpoint.save_at_end=false"], True),
                               cwd=tree, env=env_for(tree, workdir, stats, extra_env=extra_env),
                               stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    while process.poll() is None:
        rows = [m for m in reader.all_rows() if m["step"] == first_new_step]
        if len(rows) > seen:
            elapsed = time.monotonic() - started
            process.wait()
            resumed = [e for e in read_jsonl(RunDir(run_dir).events) if e["event"] == "resumed"][-1]
            first_step = rows[-1]["step_time_s"]
            figures = {"resume_s": round(elapsed, 1), "first_step_s": round(first_step, 1),
                       "resume_s_without_first_step": round(elapsed - first_step, 1),
                       **{key: resumed.get(key) for key in ("verify_s", "read_s", "prepare_s", "dcp_read_s", "apply_s")
                          if key in resumed}}
            compiled = compile_summary(stats)
            if compiled.get("process_started") and compiled.get("imported"):
                load_s = (resumed.get("verify_s") or 0) + (resumed.get("read_s") or 0)
                load_started = resumed["time"] - load_s
                step_started = launched + elapsed - first_step
                figures["parts_s"] = {
                    "launcher": round(compiled["process_started"] - launched, 1),
                    "imports": round(compiled["imported"] - compiled["process_started"], 1),
                    "build": round(load_started - compiled["imported"], 1),
                    "load": round(load_s, 1),
                    "after_load": round(step_started - resumed["time"], 1),
                    "first_step": round(first_step, 1),
                }
            figures["compile"] = {key: compiled.get(key) for key in ("counters", "phase_s", "frames", "error")
                                  if compiled.get(key)}
            return figures
        time.sleep(0.05)
    raise RuntimeError(process.stderr.read()[-3000:])


def time_load(tree: Path, workdir: Path, run_dir: Path, data_dir: Path, steps: int, label: str,
              cold: bool = False) -> dict:
    """A resume that trains no step: the run's max_steps is the checkpoint's step, so the trainer starts, loads
    the checkpoint (verification included), logs `resumed` and ends. Launch → `resumed` logged is the resume
    without its first step, measured with the run's real compile settings (whatever the load itself compiles is
    in it); split as in `time_resume`."""
    checkpoint = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    if cold:
        drop_from_page_cache(checkpoint)
    stats = workdir / f"compile-{run_dir.name}-{label}.json"
    stats.unlink(missing_ok=True)
    launched = time.time()
    result = subprocess.run(command_for(tree, run_dir, data_dir, [f"max_steps={steps}", "checkpoint.save_every=0",
                                                                 "checkpoint.save_at_end=false"], True),
                            cwd=tree, env=env_for(tree, workdir, stats), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, timeout=400)
    exited = time.time()
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    resumed = [e for e in read_jsonl(RunDir(run_dir).events) if e["event"] == "resumed"][-1]
    figures = {"to_loaded_s": round(resumed["time"] - launched, 1), "process_s": round(exited - launched, 1),
               **{key: resumed.get(key) for key in ("verify_s", "read_s", "prepare_s", "dcp_read_s", "apply_s")
                  if key in resumed}}
    compiled = compile_summary(stats)
    if compiled.get("process_started") and compiled.get("imported"):
        load_s = (resumed.get("verify_s") or 0) + (resumed.get("read_s") or 0)
        figures["parts_s"] = {"launcher": round(compiled["process_started"] - launched, 1),
                              "imports": round(compiled["imported"] - compiled["process_started"], 1),
                              "build": round(resumed["time"] - load_s - compiled["imported"], 1),
                              "load": round(load_s, 1)}
    figures["compile"] = {key: compiled.get(key) for key in ("counters", "phase_s", "frames", "error")
                          if compiled.get(key)}
    return figures


def inline_cooldown(tree: Path) -> list[str]:
    """Without milestones the config's wsd trunk must decay into max_steps (`optimizer.cooldown=inline`), as it
    did before the option existed; a tree older than the option (the previous code path) gets nothing."""
    return ["optimizer.cooldown=inline"] if "cooldown" in (tree / "genesis" / "config.py").read_text() else []


def load_only_run(workdir: Path, data_dir: Path, loads, steps: int = 2) -> dict:
    """A genesis-1b checkpoint made quickly (every torch.compile'd function eager, `steps` steps, one synchronous
    save at the end), then each of `loads` ((label, tree, cold) tuples) resumes it without training a step."""
    run_dir = workdir / "load-only"
    stats = workdir / "compile-load-only-train.json"
    overrides = [f"max_steps={steps}", "checkpoint.save_every=0", "checkpoint.milestone_every=0",
                 *inline_cooldown(REPO), "checkpoint.keep_last=1", "checkpoint.async_save=false",
                 "checkpoint.save_at_end=true"]
    started = time.monotonic()
    result = subprocess.run(command_for(REPO, run_dir, data_dir, overrides, False), cwd=REPO, capture_output=True,
                            text=True, env=env_for(REPO, workdir, stats, eager=True))
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    figures = {"checkpoint_made_s": round(time.monotonic() - started, 1)}
    try:
        for label, tree, cold in loads:
            try:
                figures[label] = time_load(tree, workdir, run_dir, data_dir, steps, label, cold)
            except Exception as err:  # noqa: BLE001 - one failed load keeps the others' figures
                figures[label] = {"error": str(err)[-1500:]}
            print(label, json.dumps(figures[label]), flush=True)
    finally:
        shutil.rmtree(run_dir)
    return figures


def async_run(tree: Path, workdir: Path, data_dir: Path, name: str, saves: int, save_every: int,
              extra: list[str] = (), more_resumes=(), on_progress=None) -> dict:
    """Train with async saves, resume once with the same code; then each of `more_resumes` ((label, tree, cold,
    start_only_before[, extra_env]) tuples: the seconds on the `time.monotonic()` clock after which it is
    skipped; environment variables for that process) resumes the
    same checkpoint. `on_progress(figures)` is called after each part, so a call cut short keeps what it measured."""
    run_dir = workdir / name
    steps = saves * save_every
    # NOTE: paused at `steps` of a run planned to steps + 2, the steps its resumes train: resuming with a larger
    # max_steps would change the schedule of the steps already done, which the trainer refuses (WSD ends its
    # cycle at max_steps).
    overrides = [f"max_steps={steps + 2}", f"checkpoint.save_every={save_every}", "checkpoint.milestone_every=0",
                 *inline_cooldown(tree), "checkpoint.keep_last=1", "checkpoint.async_save=true",
                 "checkpoint.save_at_end=false", *extra]
    metrics, events, compiled = train(tree, workdir, run_dir, data_dir, overrides, ("--stop-at-step", str(steps)))
    checkpoint = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    figures = save_figures(events, checkpoint)
    steady = [m["tokens_per_s"] for m in metrics if m["step"] % save_every not in (0, 1) and m["step"] >= 4]
    figures["trainer_tok_s"] = round(statistics.median(steady), 1)
    first = [m["step_time_s"] for m in metrics if m["step"] == 1]
    figures["train_first_step_s"] = round(first[0], 1) if first else None  # the compile from an empty cache
    figures["train_compile"] = {key: compiled.get(key) for key in ("counters", "phase_s") if compiled.get(key)}
    if on_progress:
        on_progress(figures)
    try:
        figures |= time_resume(tree, workdir, run_dir, data_dir, steps + 1)
        if on_progress:
            on_progress(figures)
        for label, resume_tree, cold, start_only_before, *extra_env in more_resumes:
            if time.monotonic() > start_only_before:
                figures[label] = {"skipped": "not enough of the call's time left"}
                continue
            try:
                figures[label] = time_resume(resume_tree, workdir, run_dir, data_dir, steps + 1, label, cold,
                                             extra_env[0] if extra_env else None)
            except Exception as err:  # noqa: BLE001 - one failed resume keeps the others' figures
                figures[label] = {"error": str(err)[-1500:]}
            print(label, json.dumps(figures[label]), flush=True)
            if on_progress:
                on_progress(figures)
    finally:
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
    parser.add_argument("--resume-anchor", type=Path, default=None,
                        help="source tree of earlier code that resumes this run's checkpoint after the current code")
    parser.add_argument("--cold-resume", action="store_true",
                        help="resume once more with the current code, the checkpoint dropped from the page cache")
    parser.add_argument("--resume-budget-s", type=float, default=1e9,
                        help="start an extra resume only if the call is younger than this")
    parser.add_argument("--no-disk-probe", action="store_true")
    parser.add_argument("--resume-again", type=int, default=0,
                        help="the current code resumes the same checkpoint this many more times (all caches warm)")
    parser.add_argument("--resume-env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment of the --resume-again resumes (e.g. TORCH_CACHING_PRECOMPILE=1: the "
                             "first of them fills Dynamo's precompile cache, the next ones read it)")
    parser.add_argument("--load-only", action="store_true",
                        help="only: make a checkpoint eagerly, then resume it without a step with this code, "
                             "--resume-anchor's, and (--cold-resume) this code from the disk; no save figures")
    parser.add_argument("--no-reader-check", action="store_true", help="skip the in-process DCP read check (GPU)")
    args = parser.parse_args()
    call_started = time.monotonic()
    import torch

    data_dir = args.workdir / "data"
    make_data(data_dir, tokens=(args.saves * args.save_every + 8) * MICRO_BATCH * 2049)
    run = {**environment(), "git_rev": git_rev(), "command": " ".join(sys.argv), "gpu": torch.cuda.get_device_name(0),
           "micro_batch": MICRO_BATCH, "save_every": args.save_every}

    if args.load_only:
        loads = [("load", REPO, False)]
        if args.resume_anchor:
            run["resume_anchor_rev"] = args.anchor_rev
            loads.append(("load_anchor", args.resume_anchor.resolve(), False))
        if args.cold_resume:
            loads.append(("load_cold", REPO, True))
        run["load_only"] = load_only_run(args.workdir, data_dir, loads)
        append_run(args.out, run, {})
        print(json.dumps(run["load_only"], indent=1))
        return
    if not args.no_reader_check:
        run["reader_check"] = reader_check(args.workdir / "reader-check")
        print("reader", json.dumps(run["reader_check"]), flush=True)
    if not args.no_disk_probe:
        run["disk_write_gb_s"] = disk_write_gb_s(args.workdir / "probe")
        run["disk_read_gb_s"] = disk_read_gb_s(args.workdir / "probe")
        print("disk write", run["disk_write_gb_s"], "read", run["disk_read_gb_s"], flush=True)
    more = []
    deadline = call_started + args.resume_budget_s
    if args.resume_anchor:
        run["resume_anchor_rev"] = args.anchor_rev
        more.append(("resume_anchor", args.resume_anchor.resolve(), False, deadline))
    if args.cold_resume:
        more.append(("resume_cold", REPO, True, deadline))
    resume_env = dict(item.split("=", 1) for item in args.resume_env)
    run["resume_env"] = resume_env
    for again in range(args.resume_again):
        more.append((f"resume_again_{again + 1}", REPO, False, deadline, resume_env))
    record = CallRecord(args.out)  # the call's entry, rewritten as each part is measured

    def keep(figures: dict) -> None:
        run["current"] = figures
        record.write(run)

    current = async_run(REPO, args.workdir, data_dir, "async", args.saves, args.save_every, more_resumes=more,
                        on_progress=keep)
    run["current"] = current
    print(json.dumps(current), flush=True)
    for threads in args.writer_threads:
        run[f"current_writer_threads_{threads}"] = async_run(REPO, args.workdir, data_dir, f"async-{threads}", 3,
                                                             args.save_every, [f"checkpoint.writer_threads={threads}"])
        print(threads, json.dumps(run[f"current_writer_threads_{threads}"]), flush=True)
    latest = {key: current[key] for key in ("steady_blocked_s", "save_complete_s", "save_gb_s", "resume_s")}
    latest |= {"resume_first_step_s": current["first_step_s"], "gpu": run["gpu"], "command": run["command"],
               "git_rev": run["git_rev"]}
    record.write(run, latest)  # kept even if the anchor below runs out of time
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
        record.write(run)  # this call's own entry, now with its anchor
    print(json.dumps(latest, indent=1))


if __name__ == "__main__":
    main()
