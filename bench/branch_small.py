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
(recipe overrides, given to the sft and branch phases alike).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import environment, write_json  # noqa: E402

DEFAULT_STEPS = 1200


def pretrain(work: Path, steps: int) -> None:
    from data_prep.pipeline import prepare
    from data_prep.sources import CorpusConfig
    from genesis.config import load_config

    started = time.time()
    corpus = load_config(CorpusConfig, REPO / "configs" / "corpus" / "data-kit.yaml", ["workers=8"])
    manifest = prepare(corpus, work / "data")
    print(f"data: {manifest.num_tokens:,} tokens in {time.time() - started:.0f} s", flush=True)
    from genesis_model.launch import trainer_command

    command = trainer_command(REPO / "configs" / "train" / "small-h100.yaml",
                              [f"data_dir={work / 'data'}", f"run_dir={work / 'trunk'}", f"max_steps={steps}",
                               f"checkpoint.milestone_every={steps}", "checkpoint.save_every=600", "eval.every=400",
                               "log_every=100"], nproc=1, trainer_args=["--resume", "auto"])
    subprocess.run(command, check=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "4"})
    print(f"pretrain done in {time.time() - started:.0f} s", flush=True)


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
    write_json(out, {**environment(), **result, "recipe_overrides": overrides, "branch_seconds": round(time.time() - started, 1),
                     "trunk": {"steps": latest["step"], "tokens_seen": latest["tokens_seen"], "val_loss": latest["val_loss"]},
                     "data_totals": report["totals"],
                     "train_logs": {stage: json.loads((branch_dir.root / stage / TRAIN_LOG).read_text())[-1]
                                    for stage in ("sft", "dpo")}})


def small_config(overrides: list[str]):
    from branch.config import BranchConfig
    from genesis.config import load_config

    return load_config(BranchConfig, REPO / "configs" / "branch" / "small.yaml", overrides)


def sft(work: Path, steps: int, overrides: list[str]) -> None:
    """Export, data and SFT of the recipe, stopping before DPO."""
    from branch.pipeline import build_data, export_base, train_sft
    from genesis.run_dir import BranchDir

    started = time.time()
    milestone, config, branch = milestone_of(work, steps), small_config(overrides), BranchDir(work / "branch")
    base = export_base(milestone)
    build_data(milestone, base, config, branch)
    train_sft(base, branch, config)
    print(f"sft phase done in {time.time() - started:.0f} s", flush=True)


def sweep(work: Path, variants: list[str], out: Path, steps: int) -> None:
    """DPO variants off the same SFT model; held-out preference accuracy (all pairs) and a short sample eval."""
    from branch.pipeline import evaluate, export_base, train_dpo
    from genesis.run_dir import TRAIN_LOG, BranchDir

    base = export_base(milestone_of(work, steps))  # the milestone's one export, made by the sft phase
    results = {}
    for variant in variants:
        name, _, overrides = variant.partition(":")
        variant_dir = work / "sweep" / name
        variant_dir.mkdir(parents=True, exist_ok=True)
        for shared in ("data", "sft"):  # read-only inputs: the recipe branch's own
            if not (variant_dir / shared).exists():
                (variant_dir / shared).symlink_to(work / "branch" / shared)
        config = small_config([o for o in overrides.split(";") if o] + ["eval.max_prompts=24", "eval.max_new_tokens=256"])
        branch = BranchDir(variant_dir)
        started = time.time()
        train_dpo(branch.sft_dir, branch, config)
        dpo_seconds = time.time() - started
        result = evaluate(base, branch.sft_dir, branch.dpo_dir, branch, config)
        results[name] = {"overrides": overrides, "dpo_seconds": round(dpo_seconds, 1),
                         **{stage: {k: result[stage][k] for k in ("preference_accuracy", "logprob_accuracy",
                                                                  "preference_accuracy_length_normalized",
                                                                  "format_adherence", "hedging_score",
                                                                  "preference_accuracy_by_source")}
                            for stage in ("sft", "dpo")},
                         "dpo_reward_accuracy_vs_sft": {k: result["dpo"][k] for k in (
                             "reward_accuracy_vs_sft", "reward_accuracy_vs_sft_length_normalized")},
                         "dpo_train_log": json.loads((branch.dpo_dir / TRAIN_LOG).read_text())[-1]}
        print(name, json.dumps(results[name]), flush=True)
        write_json(out, {**environment(), "variants": results})


def sampling(work: Path, variants: list[str], out: Path, steps: int, overrides: list[str]) -> None:
    """Format adherence, hedging and curiosity of the finished branch's SFT and DPO models under other eval
    sampling settings (each variant `name:key=value;key=value` over the recipe's `eval`), same held-out prompts."""
    from branch.evaluate import reply_metrics, sample_replies
    from branch.training import resolve_device
    from genesis.run_dir import BranchDir
    from transformers import AutoTokenizer

    branch = BranchDir(work / "branch")
    results = {}
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
        write_json(out, {**environment(), "variants": results})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("phase", choices=["pretrain", "branch", "sft", "sweep", "sampling"])
    parser.add_argument("--variants", nargs="*", default=[])
    parser.add_argument("--work", type=Path, default=Path("/tmp/gb"))
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "branch_small.json")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="trunk length; the milestone branched from")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override of configs/branch/small.yaml (sft and branch phases)")
    args = parser.parse_args()
    if args.phase == "pretrain":
        pretrain(args.work, args.steps)
    elif args.phase == "sft":
        sft(args.work, args.steps, args.overrides)
    elif args.phase == "sweep":
        sweep(args.work, args.variants, args.out, args.steps)
    elif args.phase == "sampling":
        sampling(args.work, args.variants, args.out, args.steps, args.overrides)
    else:
        branch(args.work, args.out, args.steps, args.overrides)


if __name__ == "__main__":
    main()
