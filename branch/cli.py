"""`genesis branch`: grow an SFT + DPO branch off a milestone checkpoint."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def cmd_branch(args: argparse.Namespace) -> int:
    from branch.config import BranchConfig
    from branch.pipeline import run_branch
    from genesis.config import load_config

    config = load_config(BranchConfig, args.config, args.overrides)
    result = run_branch(args.milestone, config, args.out)
    keys = ("preference_accuracy", "preference_accuracy_length_normalized", "format_adherence", "hedging_score")
    summary = {stage: {k: result[stage][k] for k in keys} for stage in ("sft", "dpo")}
    summary["dpo"]["reward_accuracy_vs_sft"] = result["dpo"]["reward_accuracy_vs_sft"]
    print(json.dumps(summary, indent=2))
    print(f"wrote {Path(args.out) / 'sft'}, {Path(args.out) / 'dpo'} and {Path(args.out) / 'eval.json'}")
    return 0


def register(sub) -> None:
    branch = sub.add_parser("branch", help="SFT then DPO off a milestone checkpoint, shaped by the principles")
    branch.add_argument("--milestone", required=True, type=Path, help="a run's milestones/step_N checkpoint")
    branch.add_argument("--config", required=True, type=Path, help="configs/branch/*.yaml")
    branch.add_argument("--out", required=True, type=Path, help="branch directory (sft/, dpo/, eval.json)")
    branch.add_argument("overrides", nargs="*", help="dotted.key=value")
    branch.set_defaults(handler=cmd_branch)
