"""FP8 training (#27.1) on one GPU: speed of genesis-1b in FP8 against Genesis bf16 and HF compiled, and the
`small` preset's validation loss trained in FP8 and in bf16 from the same seed and data.

  speed     one `bench/train_step.py` process per configuration (a fresh process each, so no compiled graph or
            allocator state carries from one into the next): Genesis bf16, Genesis FP8 (rowwise, tensorwise)
            and HF compiled, at each micro-batch; the best micro-batch of each is compared.
  quality   `python -m genesis_model.train --config configs/train/small-cycles.yaml`, cosine to --steps, once
            with parallel.float8=off and once with =tensorwise (or --recipe), side by side on the one GPU; the
            trainer's own evaluation (the same held-out batches of every source) every --eval-every steps.
            The runs' GPU readings (`gpu/0/...` in latest.json, #27.4) are kept as the tracker's check.
            `--seeds A B`: the pair from each seed, all four side by side; the figures add FP8 against bf16 per
            seed and bf16 from B against bf16 from A: the spread between seeds, measured in the same call.
  noise     the same, bf16 against bf16: one run from the config's seed, one from --other-seed, side by side;
            the first is also compared with the newest quality run's bf16 curve (same seed and data, only the
            kernels' run-to-run nondeterminism differs). The spread a 1% FP8-vs-bf16 figure is read against:
            the small preset repeats the kit's smaller sources many times in 2,000 steps (`repetition/<source>`
            in latest.json), and the held-out loss of a memorising model moves with small perturbations.

Both take `--mixture natural` (each source weighted by its share of the tokens, the same shards: none is read
twice before all are read once) and `--override KEY=VALUE` for every variant (e.g. `micro_batch_size=4
eval.batches_per_source=16`: 8,192 tokens a step, so 2,000 steps read the 17.6M-token kit about once, with the
same evaluation tokens). Each run records them as its `protocol`; a noise run compares its repeat only with a
quality run of the same protocol.

Device commands (nvidia-h200; carry `.whl` holding pydantic, xxhash and torchao wheels, and for `quality`
`runs/trunk-cycles-data`, made by `python bench/trunk_cycles.py --prepare-data`):

    python3 bench/fp8.py speed --out $OUT/fp8.json
    python3 bench/fp8.py quality --data runs/trunk-cycles-data --work /tmp/fp8q --out $OUT/fp8.json
    python3 bench/fp8.py noise --data runs/trunk-cycles-data --work /tmp/fp8n --out $OUT/fp8.json

The next quality call (BENCHMARKS "Quality in tensorwise", Next), on one line:

    python3 bench/fp8.py quality --data runs/trunk-cycles-data --work /tmp/fp8q --out $OUT/fp8.json
        --mixture natural --seeds 1234 1235 --override micro_batch_size=4 --override eval.batches_per_source=16
        --override parallel.master_weights=false

Each part appends its run to `--out` (bench.common.append_run) and the top level is recomputed from the newest
speed, quality and noise runs that have figures: `fp8_tok_s` (best micro-batch), `bf16_tok_s` (best), `hf_tok_s`
(at FP8's best micro-batch), `fp8_vs_bf16`, `fp8_vs_hf`, `val_loss_rel_diff` ((FP8 − bf16) / bf16 at the last
evaluation; with --seeds also `val_loss_rel_diff_by_seed`, `val_loss_rel_diff_mean` and
`bf16_between_seeds_rel_diff`), `bf16_repeat_rel_diff` and `bf16_other_seed_rel_diff` (noise), `gpu`, `command`
and `git_rev` of each part. The quality part also writes `fp8_quality.png` beside `--out`, the noise part
`fp8_noise.png`.

CPU check (no FP8 there: the bf16 side alone, tiny model, a few steps): `python bench/fp8.py quality --smoke`
(and `noise --smoke`).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import RESULTS_DIR, append_run, command_line, environment, git_rev, read_runs  # noqa: E402
from bench.trunk_cycles import SMOKE_OVERRIDES, smoke_data  # noqa: E402
from genesis.config import TrainConfig, load_config  # noqa: E402

CONFIG = REPO / "configs" / "train" / "small-cycles.yaml"


def child_env() -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return env


# ---------------------------------------------------------------------------------------------------------------
# Speed


def speed_configurations(micro_batches: list[int], recipes: list[str]) -> list[dict]:
    """In the order they are measured: the three the figures need first (so a call cut short still has them),
    then the other recipes and micro-batches."""
    first, rest = micro_batches[0], micro_batches[1:]
    configs = [{"impl": "genesis", "float8": "off", "mb": first}, {"impl": "genesis", "float8": recipes[0], "mb": first},
               {"impl": "hf", "float8": "off", "mb": first}]
    configs += [{"impl": "genesis", "float8": recipe, "mb": first} for recipe in recipes[1:]]
    for mb in rest:
        configs += [{"impl": "genesis", "float8": "off", "mb": mb}, {"impl": "genesis", "float8": recipes[0], "mb": mb},
                    {"impl": "hf", "float8": "off", "mb": mb}]
    return configs


def run_speed(args) -> dict:
    started = time.time()
    runs, skipped, gpu = [], [], None
    for config in speed_configurations(args.micro_batches, args.recipes):
        label = f"{config['impl']} float8={config['float8']} mb {config['mb']}"
        remaining = args.time_budget_s - (time.time() - started)
        if remaining < args.min_config_s:
            skipped.append(label)
            print(f"speed: {label} skipped ({remaining:.0f} s of the budget left)", flush=True)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "step.json"
            command = [sys.executable, str(REPO / "bench" / "train_step.py"), "--model", args.model,
                       "--impl", config["impl"], "--micro-batches", str(config["mb"]), "--steps", str(args.steps),
                       "--warmup", str(args.warmup), "--out", str(out)]
            if config["float8"] != "off":
                command += ["--float8", config["float8"]]
            t0 = time.time()
            try:
                subprocess.run(command, cwd=REPO, env=child_env(), check=False, timeout=max(60.0, remaining))
                result = json.loads(out.read_text()) if out.is_file() else {"runs": []}
                error = None
            except subprocess.TimeoutExpired:
                result, error = {"runs": []}, f"stopped at the time budget after {time.time() - t0:.0f} s"
        run = (result["runs"] or [{"error": error or "no result written"}])[0]
        run.update(impl=config["impl"], micro_batch=config["mb"], float8=config["float8"],
                   process_s=round(time.time() - t0, 1))
        runs.append(run)
        print(f"speed: {label}: {run.get('tok_s', run.get('error'))} tokens/s ({run['process_s']} s)", flush=True)
        gpu = result.get("gpu", gpu)
    best = {}
    for key in ("off", *args.recipes, "hf"):
        measured = [r for r in runs if "tok_s" in r and (r["impl"] == "hf" if key == "hf"
                                                           else r["impl"] == "genesis" and r["float8"] == key)]
        if measured:
            best[key] = max(measured, key=lambda r: r["tok_s"])
    figures: dict = {}
    fp8_best = max((best[r] for r in args.recipes if r in best), key=lambda r: r["tok_s"], default=None)
    if fp8_best is not None:
        figures["fp8_tok_s"] = fp8_best["tok_s"]
        figures["fp8_recipe"] = fp8_best["float8"]
        figures["fp8_micro_batch"] = fp8_best["micro_batch"]
        hf_same = [r for r in runs if r["impl"] == "hf" and "tok_s" in r and r["micro_batch"] == fp8_best["micro_batch"]]
        if hf_same:
            figures["hf_tok_s"] = hf_same[0]["tok_s"]
            figures["fp8_vs_hf"] = round(fp8_best["tok_s"] / hf_same[0]["tok_s"], 3)
    if "off" in best:
        figures["bf16_tok_s"] = best["off"]["tok_s"]
        figures["bf16_micro_batch"] = best["off"]["micro_batch"]
        if fp8_best is not None:
            figures["fp8_vs_bf16"] = round(fp8_best["tok_s"] / best["off"]["tok_s"], 3)
    return {"part": "speed", "model": args.model, "gpu": gpu, "runs": runs, "skipped": skipped,
            "figures": figures, "seconds": round(time.time() - started, 1)}


# ---------------------------------------------------------------------------------------------------------------
# Quality


def read_curve(run_dir: Path) -> tuple[list[list], dict]:
    """(validation loss per step from metrics.jsonl, the newest GPU readings there: `gpu/<rank>/...`, #27.4)."""
    curve, gpu = {}, {}
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row.get("step"), int) and "val_loss/all" in row:
                curve[row["step"]] = round(row["val_loss/all"], 5)
            readings = {k: v for k, v in row.items() if k.startswith("gpu/")}
            if readings:
                gpu = {"step": row.get("step"), **readings}
    return [[s, curve[s]] for s in sorted(curve)], gpu


def plot_quality(curves: dict, out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, curve in curves.items():
        if curve:
            ax.plot([s for s, _ in curve], [v for _, v in curve], label=name, marker=".")
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (all sources)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def natural_mixture(data_dir: Path, out_dir: Path) -> Path:
    """`data_dir`'s shards and tokenizer (linked, not copied) under a manifest that weights each source by its
    share of the tokens: every source is read at the same pace, so none is repeated before all have been read
    once. The kit's own mixture gives web 15% of the windows from 1% of the tokens, which 2,000 steps of the
    small preset read 63 times over (BENCHMARKS "Quality in tensorwise")."""
    from genesis.manifest import read_manifest, write_manifest

    manifest = read_manifest(data_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tops = {Path(shard.path).parts[0] for source in manifest.sources for shard in source.shards}
    tops |= {Path(manifest.tokenizer.path).parts[0], *(Path(path).parts[0] for path in manifest.tokenizer.hf_files)}
    for top in sorted(tops):
        link, target = out_dir / top, (data_dir / top).resolve()
        if link.is_symlink() and link.resolve() != target:  # made from another kit in the same --work
            link.unlink()
        if not link.is_symlink():
            link.symlink_to(target)
    total = manifest.num_tokens
    for source in manifest.sources:
        source.weight = source.num_tokens / total
    write_manifest(out_dir, manifest)
    return out_dir


def train_side_by_side(args, variants: dict[str, list[str]]) -> dict:
    """One `genesis_model.train` per variant (its name -> its overrides), all at once on the one GPU, stopped at
    the time budget (the trainer saves on SIGTERM, so the curve so far is kept). Returns what a quality or noise
    run records of them: exits, last steps, validation curves (`val_loss`) and GPU readings, each by variant."""
    started = time.time()
    processes = {}
    for name, overrides in variants.items():
        run_dir = args.work / name
        command = [sys.executable, "-m", "genesis_model.train", "--config", str(CONFIG),
                   *(SMOKE_OVERRIDES if args.smoke else []), f"data_dir={args.data}", f"run_dir={run_dir}",
                   f"max_steps={args.steps}", "optimizer.schedule=cosine", f"eval.every={args.eval_every}",
                   "checkpoint.milestone_every=0", *args.override, *overrides, "--resume", "auto"]
        args.work.mkdir(parents=True, exist_ok=True)
        log = open(args.work / f"{name}.log", "a")
        log.write("$ " + shlex.join(command) + "\n")
        log.flush()
        processes[name] = (subprocess.Popen(command, cwd=REPO, env=child_env(), stdout=log,
                                            stderr=subprocess.STDOUT), log, run_dir)
    deadline = started + args.time_budget_s
    exits = {}
    for name, (process, log, _) in processes.items():
        try:
            exits[name] = process.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            process.terminate()
            exits[name] = f"stopped at the time budget ({process.wait()})"
        log.close()
    curves, last, gpu_readings = {}, {}, {}
    for name, (_, _, run_dir) in processes.items():
        curves[name], gpu_readings[name] = read_curve(run_dir)
        latest = json.loads((run_dir / "latest.json").read_text()) if (run_dir / "latest.json").is_file() else {}
        last[name] = latest.get("step")
    return {"steps": args.steps, "protocol": protocol(args), "exits": exits, "last_step": last, "val_loss": curves,
            "gpu_readings": gpu_readings, "seconds": round(time.time() - started, 1)}


def compare_curves(reference: list[list], other: list[list]) -> dict:
    """(other − reference) / reference at the last step both evaluated, and the largest |difference| over the
    steps both evaluated; {} when they share no step."""
    at_reference, at_other = dict(map(tuple, reference)), dict(map(tuple, other))
    common = sorted(set(at_reference) & set(at_other))
    if not common:
        return {}
    step = common[-1]
    return {"step": step, "reference": at_reference[step], "other": at_other[step],
            "rel_diff": round((at_other[step] - at_reference[step]) / at_reference[step], 5),
            "max_abs_rel_diff_over_curve": round(max(abs(at_other[s] - at_reference[s]) / at_reference[s]
                                                     for s in common), 5)}


def seed_suffix(seeds: list[int], index: int) -> str:
    """The variant names' suffix for the seed at `index`: none for the first (the names earlier runs used)."""
    return "" if index == 0 else f"_seed{seeds[index]}"


def quality_variants(seeds: list[int], recipe: str, smoke: bool) -> dict[str, list[str]]:
    """bf16 and FP8 from each seed. The first seed's pair keeps the names every earlier run used ("bf16",
    "fp8_<recipe>"); another seed's pair is suffixed with it. The CPU smoke has no FP8: bf16 alone."""
    variants = {}
    for index, seed in enumerate(seeds):
        suffix = seed_suffix(seeds, index)
        variants[f"bf16{suffix}"] = ["parallel.float8=off", f"seed={seed}"]
        if not smoke:
            variants[f"fp8_{recipe}{suffix}"] = [f"parallel.float8={recipe}", f"seed={seed}"]
    return variants


def quality_figures(curves: dict[str, list[list]], seeds: list[int], recipe: str) -> dict:
    """The first seed's FP8-vs-bf16 comparison (the issue's figure: same seed, same data). With more seeds, FP8
    against bf16 from each of them, their mean, and bf16 from each other seed against bf16 from the first: the
    spread between seeds, measured in the same call, that the FP8 difference is read against."""
    suffixes = {seed: seed_suffix(seeds, index) for index, seed in enumerate(seeds)}
    pairs = {seed: compare_curves(curves.get(f"bf16{suffix}", []), curves.get(f"fp8_{recipe}{suffix}", []))
             for seed, suffix in suffixes.items()}
    first = pairs[seeds[0]]
    if not first:
        return {}
    figures = {"val_loss_step": first["step"], "val_loss_bf16": first["reference"], "val_loss_fp8": first["other"],
               "val_loss_rel_diff": first["rel_diff"],
               "max_abs_rel_diff_over_curve": first["max_abs_rel_diff_over_curve"]}
    if len(seeds) > 1:
        by_seed = {str(seed): pair["rel_diff"] for seed, pair in pairs.items() if pair}
        figures["val_loss_rel_diff_by_seed"] = by_seed
        figures["val_loss_rel_diff_mean"] = round(sum(by_seed.values()) / len(by_seed), 5)
        between = {str(seed): compare_curves(curves["bf16"], curves.get(f"bf16{suffixes[seed]}", [])).get("rel_diff")
                   for seed in seeds[1:]}
        figures["bf16_between_seeds_rel_diff"] = {seed: diff for seed, diff in between.items() if diff is not None}
    return figures


def run_quality(args) -> dict:
    seeds = args.seeds or [load_config(TrainConfig, CONFIG).seed]
    trained = train_side_by_side(args, quality_variants(seeds, args.recipe, args.smoke))
    figures = quality_figures(trained["val_loss"], seeds, args.recipe)
    plot_path = args.out.parent / "fp8_quality.png"
    plot_quality(trained["val_loss"], plot_path, f"small preset, {args.steps} steps, bf16 vs FP8 ({args.recipe})")
    return {"part": "quality", "recipe": args.recipe, "seeds": seeds, **trained, "figures": figures,
            "plot": plot_path.name}


def run_noise(args) -> dict:
    """bf16 against bf16: the spread the quality part's FP8-vs-bf16 difference is read against. Two bf16 runs side
    by side, from the config's seed and from --other-seed; the first is also compared with the bf16 run of the
    newest quality run in --out (same seed and data, another process: only the kernels' run-to-run
    nondeterminism differs, when the git revision and the data are the same)."""
    seed = load_config(TrainConfig, CONFIG).seed
    variants = {f"bf16_seed{seed}": ["parallel.float8=off"],
                f"bf16_seed{args.other_seed}": ["parallel.float8=off", f"seed={args.other_seed}"]}
    trained = train_side_by_side(args, variants)
    curves = trained["val_loss"]
    same_seed, other_seed = curves[f"bf16_seed{seed}"], curves[f"bf16_seed{args.other_seed}"]
    figures: dict = {}
    between_seeds = compare_curves(same_seed, other_seed)
    if between_seeds:
        figures["bf16_other_seed_rel_diff"] = between_seeds["rel_diff"]
        figures["bf16_other_seed_max_abs_rel_diff_over_curve"] = between_seeds["max_abs_rel_diff_over_curve"]
    earlier = [run for run in read_runs(args.out) if run.get("part") == "quality" and run.get("steps") == args.steps
               and run.get("protocol", KIT_PROTOCOL) == trained["protocol"]]
    quality_bf16 = {"bf16 (newest quality run)": earlier[-1]["val_loss"].get("bf16", [])} if earlier else {}
    repeat = compare_curves(next(iter(quality_bf16.values()), []), same_seed)
    if repeat:
        repeat["against"] = {"git_rev": earlier[-1].get("git_rev"), "command": earlier[-1].get("command")}
        figures["bf16_repeat_rel_diff"] = repeat["rel_diff"]
        figures["bf16_repeat_max_abs_rel_diff_over_curve"] = repeat["max_abs_rel_diff_over_curve"]
    plot_path = args.out.parent / "fp8_noise.png"
    plot_quality({**quality_bf16, **curves}, plot_path, f"small preset, {args.steps} steps, bf16 against bf16")
    return {"part": "noise", **trained, "between_seeds": between_seeds, "repeat_of_quality_bf16": repeat,
            "figures": figures, "plot": plot_path.name}


# The quality runs before --mixture and --override existed: the kit's mixture, the config as it is.
KIT_PROTOCOL = {"mixture": "kit", "overrides": []}


def protocol(args) -> dict:
    """What every variant of a quality or noise run shares beyond the config file: the mixture, the overrides, and
    Inductor's switches from the environment (TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=0 shortens FP8's first
    compile by minutes: genesis_model/parallelize.py)."""
    inductor_env = {key: value for key, value in sorted(os.environ.items()) if key.startswith("TORCHINDUCTOR_")}
    recorded = {"mixture": args.mixture, "overrides": list(args.override)}
    return {**recorded, "env": inductor_env} if inductor_env else recorded


# ---------------------------------------------------------------------------------------------------------------


def top_level(path: Path, new_run: dict) -> dict:
    """The issue's top-level record from the newest speed, quality and noise run that has figures (this one
    included): a run cut short before its first comparable evaluation does not hide the last one that had one."""
    newest = {}
    for run in [*read_runs(path), new_run]:
        if run.get("figures"):
            newest[run.get("part")] = run
    latest: dict = {"gpu": new_run.get("machine"), "command": {}, "git_rev": {}}
    for part in ("speed", "quality", "noise"):
        run = newest.get(part)
        if run is None:
            continue
        latest.update(run["figures"])
        if part == "quality":
            latest["val_loss_recipe"] = run.get("recipe")
            latest["val_loss_protocol"] = run.get("protocol", KIT_PROTOCOL)
        latest["command"][part] = run.get("command")
        latest["git_rev"][part] = run.get("git_rev")
    return latest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["speed", "quality", "noise"])
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "fp8.json")
    parser.add_argument("--time-budget-s", type=float, default=540)
    speed = parser.add_argument_group("speed")
    speed.add_argument("--model", default="genesis-1b")
    speed.add_argument("--micro-batches", nargs="+", type=int, default=[8, 16])
    speed.add_argument("--recipes", nargs="+", default=["rowwise", "tensorwise"], choices=["rowwise", "tensorwise"])
    speed.add_argument("--steps", type=int, default=10)
    speed.add_argument("--warmup", type=int, default=3)
    speed.add_argument("--min-config-s", type=float, default=75,
                       help="a configuration is not started with less of the budget left (its compile alone)")
    quality = parser.add_argument_group("quality")
    quality.add_argument("--data", type=Path, default=REPO / "runs" / "trunk-cycles-data")
    quality.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "genesis-fp8-quality")
    quality.add_argument("--quality-steps", dest="quality_steps", type=int, default=2000)
    quality.add_argument("--eval-every", type=int, default=100)
    # tensorwise: the recipe of the speed figures (BENCHMARKS "FP8 training"); the first quality run was rowwise.
    quality.add_argument("--recipe", default="tensorwise", choices=["rowwise", "tensorwise"])
    quality.add_argument("--smoke", action="store_true", help="CPU check: tiny model, synthetic data, bf16 only")
    quality.add_argument("--other-seed", type=int, default=1235, help="noise: the second bf16 run's seed")
    quality.add_argument("--seeds", nargs="+", type=int, default=None,
                         help="quality: bf16 and FP8 from each seed, all side by side (default: the config's seed)")
    quality.add_argument("--mixture", choices=["kit", "natural"], default="kit",
                         help="kit: the prepared data's weights; natural: each source by its share of the tokens")
    quality.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                         help="a config override for every variant, e.g. micro_batch_size=4 (repeatable)")
    args = parser.parse_args(argv)

    if args.part in ("quality", "noise"):
        args.steps = args.quality_steps
        if args.smoke:
            args.data = args.work / "data"
            smoke_data(args.data)
        elif not (args.data / "manifest.json").is_file():
            print(f"error: {args.data}/manifest.json not found: make it with `python bench/trunk_cycles.py "
                  f"--prepare-data --data {args.data}` and carry it", file=sys.stderr)
            return 2
        if args.mixture == "natural":
            args.data = natural_mixture(args.data, args.work / "data-natural")
        run = run_quality(args) if args.part == "quality" else run_noise(args)
    else:
        run = run_speed(args)
    run = {**environment(), "command": command_line("fp8.py", argv), "git_rev": git_rev(), **run}
    # The top level is recomputed from every run: a one-seed quality run leaves no two-seed figures beside its own.
    data = append_run(args.out, run, top_level(args.out, run), whole_top=True)
    print(json.dumps({k: v for k, v in data.items() if k != "runs"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
