"""One GPU branch of the `small` preset on the offline data kit: the figures of the branches issue.

    python bench/branch_small.py pretrain --work /tmp/gb     # data kit → token shards → small trunk, milestone
    python bench/branch_small.py branch --work /tmp/gb --out bench/results/branch_small.json

Two phases because one device call is limited to 10 minutes; the work directory persists between them.
A DPO sweep reuses one SFT model for several DPO recipes (each variant: `name:key=value;key=value`):

    python bench/branch_small.py sft --work /tmp/gb
    python bench/branch_small.py sweep --work /tmp/gb --variants "s01:dpo.loss_type=[sigmoid];dpo.beta=0.1" ...

The finished branch's replies under other sampling settings (format, hedging; `name:key=value;...` over `eval`):

    python bench/branch_small.py sampling --work /tmp/gb --out /tmp/sampling.json --variants "t02:temperature=0.2;top_p=0.9"

A longer trunk or a changed recipe: `--steps 2400` (give every phase the same value) and `--set sft.epochs=4`
(recipe overrides, given to the sft, sweep and branch phases alike). `pretrain --data DIR` trains on token shards
prepared beforehand (the device has no `datasets`; `bench/trunk_cycles.py --prepare-data` makes them).

Results: the branch, sweep, sampling and seeds phases each append one run to `--out`, with its command and git
revision (bench.common); sweep and sampling rewrite their own run after each variant, so a call cut off keeps the
variants it finished. Nothing earlier is overwritten; a file written before runs were kept becomes `runs[0]`.

DPO's cost in format adherence over several seeds (issue: trunk cycles, item 4): one trunk, then per seed its own
SFT (`seed=N`: the branch's held-out split and the trainers' seeds) and every DPO variant off it, all in parallel
processes on the one GPU (a branch of the small preset keeps an H200 about a tenth busy), each evaluated as the
recipe evaluates (300 replies per model):

    python bench/branch_small.py seeds --work /tmp/gb --seeds 0 1 2 --variants "recipe:" "lr1e-5:dpo.learning_rate=1e-5" \
        --out /tmp/gb/dpo_format_seeds.json
"""

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import CallRecord, append_run, command_line, environment, git_rev, read_runs  # noqa: E402

DEFAULT_STEPS = 1200
TRUNK_CONFIG = REPO / "configs" / "train" / "small-h100.yaml"


def pretrain(work: Path, steps: int, data: Path | None = None, train_config: Path = TRUNK_CONFIG,
             trunk_overrides: list[str] = ()) -> None:
    """The data kit's token shards (prepared here, or `data` prepared beforehand), then the small trunk."""
    started = time.time()
    if data is None:
        from data_prep.pipeline import prepare
        from data_prep.sources import CorpusConfig
        from genesis.config import load_config

        corpus = load_config(CorpusConfig, REPO / "configs" / "corpus" / "data-kit.yaml", ["workers=8"])
        data = work / "data"
        manifest = prepare(corpus, data)
        print(f"data: {manifest.num_tokens:,} tokens in {time.time() - started:.0f} s", flush=True)
    from genesis_model.launch import trainer_command

    command = trainer_command(train_config,
                              [f"data_dir={Path(data).resolve()}", f"run_dir={work / 'trunk'}", f"max_steps={steps}",
                               f"checkpoint.milestone_every={steps}", "checkpoint.save_every=600", "eval.every=400",
                               "log_every=100", *trunk_overrides], nproc=1, trainer_args=["--resume", "auto"])
    subprocess.run(command, check=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "4"})
    print(f"pretrain done in {time.time() - started:.0f} s", flush=True)


def call_record() -> dict:
    """What every run this script appends starts with: machine, versions, date, command and git revision."""
    return {**environment(), "command": command_line("branch_small.py"), "git_rev": git_rev()}


def milestone_of(work: Path, steps: int) -> Path:
    return work / "trunk" / "milestones" / f"step_{steps:08d}"


def branch(work: Path, out: Path, steps: int, overrides: list[str]) -> None:
    from genesis.run_dir import TRAIN_LOG, BranchDir, RunDir

    started = time.time()
    subprocess.run([sys.executable, "-m", "cli.main", "branch", "--milestone", str(milestone_of(work, steps)),
                    "--config", str(REPO / "configs" / "branch" / "small.yaml"), "--out", str(work / "branch"),
                    *overrides], check=True, cwd=REPO)
    branch_dir = BranchDir(work / "branch")
    result = branch_dir.read_eval()
    latest = RunDir(work / "trunk").read_latest()
    report = json.loads(branch_dir.report.read_text())
    append_run(out, {**call_record(), **result, "recipe_overrides": overrides,
                     "branch_seconds": round(time.time() - started, 1),
                     "trunk": {"steps": latest["step"], "tokens_seen": latest["tokens_seen"],
                               "val_loss": latest["val_loss"]},
                     "data_totals": report["totals"],
                     "train_logs": {stage: json.loads((branch_dir.root / stage / TRAIN_LOG).read_text())[-1]
                                    for stage in ("sft", "dpo")}}, {})


def small_config(overrides: list[str]):
    from branch.config import BranchConfig
    from genesis.config import load_config

    return load_config(BranchConfig, REPO / "configs" / "branch" / "small.yaml", overrides)


def sft(work: Path, steps: int, overrides: list[str], branch_name: str = "branch") -> None:
    """Export, data and SFT of the recipe, stopping before DPO."""
    from branch.pipeline import build_data, export_base, train_sft
    from genesis.run_dir import BranchDir

    started = time.time()
    milestone, config, branch = milestone_of(work, steps), small_config(overrides), BranchDir(work / branch_name)
    base = export_base(milestone)
    build_data(milestone, base, config, branch)
    train_sft(base, branch, config)
    print(f"sft phase done in {time.time() - started:.0f} s", flush=True)


QUICK_EVAL = ["eval.max_prompts=24", "eval.max_new_tokens=256", "eval.replies_per_prompt=1"]


def sweep(work: Path, variants: list[str], out: Path, steps: int, overrides: list[str] = (),
          branch_name: str = "branch", full_eval: bool = False) -> None:
    """DPO variants off the same SFT model; held-out preference accuracy (all pairs) and a sample eval: a short
    one (24 prompts, 256 new tokens, one reply each), or with `full_eval` the recipe's own."""
    from branch.pipeline import evaluate, export_base, train_dpo
    from genesis.run_dir import TRAIN_LOG, BranchDir

    base = export_base(milestone_of(work, steps))  # the milestone's one export, made by the sft phase
    sweep_root = work / ("sweep" if branch_name == "branch" else f"sweep-{branch_name}")
    results, record, call = {}, CallRecord(out), call_record()
    for variant in variants:
        name, _, variant_overrides = variant.partition(":")
        variant_dir = sweep_root / name
        variant_dir.mkdir(parents=True, exist_ok=True)
        for shared in ("data", "sft"):  # read-only inputs: the recipe branch's own
            if not (variant_dir / shared).exists():
                (variant_dir / shared).symlink_to(work / branch_name / shared)
        config = small_config(list(overrides) + [o for o in variant_overrides.split(";") if o]
                              + ([] if full_eval else QUICK_EVAL))
        branch = BranchDir(variant_dir)
        started = time.time()
        train_dpo(branch.sft_dir, branch, config)
        dpo_seconds = time.time() - started
        result = evaluate(base, branch.sft_dir, branch.dpo_dir, branch, config)
        results[name] = {"overrides": variant_overrides, "dpo_seconds": round(dpo_seconds, 1),
                         "eval": config.eval.model_dump(), "format_check": result["format_check"],
                         **{stage: {k: result[stage][k] for k in ("preference_accuracy", "logprob_accuracy",
                                                                  "preference_accuracy_length_normalized",
                                                                  "format_adherence", "ended", "hedging_score",
                                                                  "curiosity_score", "mean_reply_chars",
                                                                  "preference_accuracy_by_source")}
                            for stage in ("sft", "dpo")},
                         "dpo_reward_accuracy_vs_sft": {k: result["dpo"][k] for k in (
                             "reward_accuracy_vs_sft", "reward_accuracy_vs_sft_length_normalized")},
                         "dpo_train_log": json.loads((branch.dpo_dir / TRAIN_LOG).read_text())[-1]}
        print(name, json.dumps(results[name]), flush=True)
        record.write({**call, "branch": branch_name, "recipe_overrides": list(overrides), "variants": results})


def _run_all(commands: dict[str, list[str]], logs: Path) -> None:
    """Run the commands at once (each its own process, its output in logs/NAME.log); fail when any fails."""
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false"}
    with contextlib.ExitStack() as stack:
        running = {name: subprocess.Popen(command, cwd=REPO, env=env, stderr=subprocess.STDOUT,
                                          stdout=stack.enter_context((logs / f"{name}.log").open("w")))
                   for name, command in commands.items()}
        failed = [name for name, process in running.items() if process.wait() != 0]
    if failed:
        raise SystemExit(f"failed: {failed}; see {[str(logs / f'{name}.log') for name in failed]}")


def seeds(work: Path, seed_list: list[int], variants: list[str], out: Path, steps: int, overrides: list[str]) -> None:
    """Per seed an SFT model (the recipe with `seed=N`), then every DPO variant off each, all evaluated as the
    recipe evaluates; `out` gets every reading and, per variant, the largest SFT − DPO format adherence."""
    from branch.pipeline import export_base

    started = time.time()
    export_base(milestone_of(work, steps))  # once, before the processes that read it start
    me = [sys.executable, str(Path(__file__).resolve()), "--work", str(work), "--steps", str(steps)]
    sets = [f"--set={o}" for o in overrides]
    _run_all({f"sft-s{seed}": [*me, "sft", f"--branch=branch-s{seed}", *sets, f"--set=seed={seed}"]
              for seed in seed_list}, work / "logs")
    sft_seconds = time.time() - started
    readings = work / "seeds"
    names = {variant: variant.partition(":")[0] for variant in variants}
    _run_all({f"dpo-s{seed}-{names[variant]}": [
        *me, "sweep", f"--branch=branch-s{seed}", "--full-eval", *sets, f"--set=seed={seed}",
        f"--out={readings / f's{seed}-{names[variant]}.json'}", "--variants", variant]
        for seed in seed_list for variant in variants}, work / "logs")
    by_variant: dict[str, dict] = {}
    for variant, name in names.items():
        per_seed = {seed: read_runs(readings / f"s{seed}-{name}.json")[-1]["variants"][name] for seed in seed_list}
        drops = {seed: round(r["sft"]["format_adherence"] - r["dpo"]["format_adherence"], 4)
                 for seed, r in per_seed.items()}
        by_variant[name] = {"overrides": variant.partition(":")[2], "dpo_format_drop": max(drops.values()),
                            "format_drop_per_seed": drops, "seeds": per_seed}
    append_run(out, {**call_record(), "trunk_steps": steps, "seeds_list": seed_list, "recipe_overrides": overrides,
                     "sft_phase_seconds": round(sft_seconds, 1), "seconds": round(time.time() - started, 1),
                     "variants": by_variant}, {})
    for name, reading in by_variant.items():
        print(name, "largest format drop", reading["dpo_format_drop"], reading["format_drop_per_seed"], flush=True)


def sampling(work: Path, variants: list[str], out: Path, steps: int, overrides: list[str]) -> None:
    """Format adherence, hedging and curiosity of the finished branch's SFT and DPO models under other eval
    sampling settings (each variant `name:key=value;key=value` over the recipe's `eval`), same held-out prompts."""
    from branch.evaluate import reply_metrics, sample_replies
    from branch.training import resolve_device
    from genesis.run_dir import BranchDir
    from transformers import AutoTokenizer

    branch = BranchDir(work / "branch")
    results, record, call = {}, CallRecord(out), call_record()
    for variant in variants:
        name, _, variant_overrides = variant.partition(":")
        config = small_config(overrides + [f"eval.{o}" for o in variant_overrides.split(";") if o])
        tokenizer = AutoTokenizer.from_pretrained(str(branch.sft_dir))
        prompts = branch.read_data("heldout_prompts")[: config.eval.max_prompts]
        started = time.time()
        results[name] = {"eval": config.eval.model_dump()}
        for stage, model_dir in (("sft", branch.sft_dir), ("dpo", branch.dpo_dir)):
            results[name][stage] = reply_metrics(sample_replies(model_dir, tokenizer, prompts, config.eval,
                                                                resolve_device(config.device)), prompts)
        results[name]["seconds"] = round(time.time() - started, 1)
        print(name, json.dumps(results[name]), flush=True)
        record.write({**call, "variants": results})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("phase", choices=["pretrain", "branch", "sft", "sweep", "sampling", "seeds"])
    parser.add_argument("--variants", nargs="*", default=[])
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2], help="seeds phase: the branch seeds")
    parser.add_argument("--branch", default="branch", help="sft and sweep phases: the branch directory under --work")
    parser.add_argument("--full-eval", action="store_true", help="sweep phase: the recipe's evaluation, not a short one")
    parser.add_argument("--data", type=Path, default=None, help="pretrain phase: token shards prepared beforehand")
    parser.add_argument("--train-config", type=Path, default=TRUNK_CONFIG, help="pretrain phase: the trunk's config "
                        "(a CPU check of this script: configs/train/tiny-cpu.yaml)")
    parser.add_argument("--trunk-set", dest="trunk_overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="pretrain phase: override of the trunk's config (e.g. model.vocab_size=49152)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/gb"))
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "branch_small.json")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="trunk length; the milestone branched from")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override of configs/branch/small.yaml (sft, sweep, seeds and branch phases)")
    args = parser.parse_args()
    if args.phase == "pretrain":
        pretrain(args.work, args.steps, args.data, args.train_config, args.trunk_overrides)
    elif args.phase == "sft":
        sft(args.work, args.steps, args.overrides, args.branch)
    elif args.phase == "sweep":
        sweep(args.work, args.variants, args.out, args.steps, args.overrides, args.branch, args.full_eval)
    elif args.phase == "seeds":
        seeds(args.work, args.seeds, args.variants, args.out, args.steps, args.overrides)
    elif args.phase == "sampling":
        sampling(args.work, args.variants, args.out, args.steps, args.overrides)
    else:
        branch(args.work, args.out, args.steps, args.overrides)


if __name__ == "__main__":
    main()
