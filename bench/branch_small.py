"""One GPU branch of the `small` preset on the offline data kit: the figures of the branches issue.

    python bench/branch_small.py pretrain --work /tmp/gb     # data kit → token shards → small trunk, milestone
    python bench/branch_small.py branch --work /tmp/gb --out bench/results/branch_small.json

Two phases because one device call is limited to 10 minutes; the work directory persists between them.
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

STEPS = 1200


def pretrain(work: Path) -> None:
    from data_prep.pipeline import prepare
    from data_prep.sources import CorpusConfig
    from genesis.config import load_config

    started = time.time()
    corpus = load_config(CorpusConfig, REPO / "configs" / "corpus" / "data-kit.yaml", ["workers=8"])
    manifest = prepare(corpus, work / "data")
    print(f"data: {manifest.num_tokens:,} tokens in {time.time() - started:.0f} s", flush=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "-m", "genesis_model.train",
               "--config", str(REPO / "configs" / "train" / "small-h100.yaml"), f"data_dir={work / 'data'}",
               f"run_dir={work / 'trunk'}", f"max_steps={STEPS}", f"checkpoint.milestone_every={STEPS}",
               "checkpoint.save_every=600", "eval.every=400", "log_every=100", "--resume", "auto"]
    subprocess.run(command, check=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "4"})
    print(f"pretrain done in {time.time() - started:.0f} s", flush=True)


def branch(work: Path, out: Path) -> None:
    started = time.time()
    milestone = work / "trunk" / "milestones" / f"step_{STEPS:08d}"
    subprocess.run([sys.executable, "-m", "genesis.cli", "branch", "--milestone", str(milestone), "--config",
                    str(REPO / "configs" / "branch" / "small.yaml"), "--out", str(work / "branch")],
                   check=True, cwd=REPO)
    result = json.loads((work / "branch" / "eval.json").read_text())
    latest = json.loads((work / "trunk" / "latest.json").read_text())
    report = json.loads((work / "branch" / "data" / "report.json").read_text())
    write_json(out, {**environment(), **result, "branch_seconds": round(time.time() - started, 1),
                     "trunk": {"steps": latest["step"], "tokens_seen": latest["tokens_seen"], "val_loss": latest["val_loss"]},
                     "data_totals": report["totals"],
                     "train_logs": {stage: json.loads((work / "branch" / stage / "train_log.json").read_text())[-1]
                                    for stage in ("sft", "dpo")}})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("phase", choices=["pretrain", "branch"])
    parser.add_argument("--work", type=Path, default=Path("/tmp/gb"))
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "branch_small.json")
    args = parser.parse_args()
    pretrain(args.work) if args.phase == "pretrain" else branch(args.work, args.out)


if __name__ == "__main__":
    main()
