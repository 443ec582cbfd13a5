"""`genesis branch`: grow an SFT + DPO branch off a milestone checkpoint."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from genesis.cli_help import examples


def cmd_branch(args: argparse.Namespace) -> int:
    from branch.config import BranchConfig
    from branch.pipeline import grow
    from genesis.config import load_config
    from genesis.run_dir import BranchDir

    config = load_config(BranchConfig, args.config, args.overrides)
    result = grow(args.milestone, config, args.out)
    keys = ("preference_accuracy", "preference_accuracy_length_normalized", "format_adherence", "hedging_score")
    summary = {stage: {k: result[stage][k] for k in keys} for stage in ("sft", "dpo")}
    summary["dpo"]["reward_accuracy_vs_sft"] = result["dpo"]["reward_accuracy_vs_sft"]
    print(json.dumps(summary, indent=2))
    branch = BranchDir(args.out)
    print(f"wrote {branch.sft_dir}, {branch.dpo_dir} and {branch.eval_path}")
    return 0


def register(sub) -> None:
    branch = sub.add_parser(
        "branch", help="SFT then DPO off a milestone checkpoint, shaped by the principles",
        epilog=examples("genesis branch --milestone runs/demo/trunk/milestones/step_00000200 "
                        "--config configs/branch/tiny.yaml --out runs/demo/branch-200-again"))
    branch.add_argument("--milestone", required=True, type=Path, help="a run's milestones/step_N checkpoint")
    branch.add_argument("--config", required=True, type=Path, help="configs/branch/*.yaml")
    branch.add_argument("--out", required=True, type=Path, help="branch directory (sft/, dpo/, eval.json)")
    branch.add_argument("overrides", nargs="*", help="dotted.key=value")
    branch.set_defaults(handler=cmd_branch)
