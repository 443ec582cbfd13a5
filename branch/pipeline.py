"""One branch, end to end: milestone → base → data → SFT → DPO → eval.json.

    <run_dir>/hf/step_N/  the base: the milestone exported once (branch/base.py), shared by every branch off it
    DIR/data/             sft.jsonl, dpo_train.jsonl, dpo_heldout.jsonl, heldout_prompts.jsonl, report.json
    DIR/branch.json       what grew from what (milestone, step, base, config, data digests)
    DIR/sft/, DIR/dpo/    HF model directories (tokenizer and chat template included)
    DIR/eval.json         written last: a branch with eval.json is complete

Each stage is a function of the paths it reads that returns the paths it wrote; `grow` runs them in order under
the branch's lock, and the branch flow runs each as a task. Every stage writes under a temporary name and
renames when done, and a finished stage is kept: rerunning after a crash picks up at the first unfinished one.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

from branch.base import check_milestone, export_milestone, exported_from
from branch.config import BranchConfig
from branch.data import assemble_data, write_json, write_jsonl
from genesis.errors import GenesisError
from genesis.run_dir import BranchDir, read_meta, stage_complete

# Fault injection for tests and drills: GENESIS_BRANCH_FAIL_STAGE=export|data|sft|dpo|eval raises just before
# that stage, as a crash there would, so resumption can be exercised on the real pipeline.
FAIL_STAGE_ENV = "GENESIS_BRANCH_FAIL_STAGE"
DATA_FILES = ("sft", "dpo_train", "dpo_heldout", "heldout_prompts")
HEADLINE = ("preference_accuracy", "format_adherence", "hedging_score")


# Who records a training stage while it runs: a callable (stage, branch) → context manager entered around SFT's or
# DPO's training, yielding the transformers TrainerCallbacks to train with. lineage's connect() installs MLflow's (a
# run per stage that spans its training, lineage/stages.py); without one a stage records nothing but its directory.
StageRecorder = Callable[[str, BranchDir], AbstractContextManager[list]]
_stage_recorder: StageRecorder | None = None


def set_stage_recorder(recorder: StageRecorder | None) -> StageRecorder | None:
    """Install the recorder of training stages (None: none); returns the one it replaces."""
    global _stage_recorder
    previous, _stage_recorder = _stage_recorder, recorder
    return previous


def _recording(stage: str, branch: BranchDir) -> AbstractContextManager[list]:
    return _stage_recorder(stage, branch) if _stage_recorder is not None else nullcontext([])


def fail_if_injected(stage: str) -> None:
    if os.environ.get(FAIL_STAGE_ENV) == stage:
        raise RuntimeError(f"injected failure before the {stage} stage ({FAIL_STAGE_ENV}={stage})")


def _device(config: BranchConfig) -> str:
    from branch.training import resolve_device

    return resolve_device(config.device)


def _threads(config: BranchConfig) -> None:
    if config.threads:
        import torch

        torch.set_num_threads(config.threads)


def _system_prompt(branch: BranchDir) -> str:
    return json.loads(branch.report.read_text())["system_prompt"]


# -------------------------------------------------------------------------------------------------------------
# The stages


def export_base(milestone: Path, log=print) -> Path:
    """1. The milestone checked (complete, chat-capable tokenizer), then its one export: the branch's base."""
    check_milestone(milestone)
    fail_if_injected("export")
    return export_milestone(milestone, lambda line: log(f"[branch 1/5] {line}"))


def build_data(milestone: Path, base: Path, config: BranchConfig, branch: BranchDir, log=print) -> BranchDir:
    """2. SFT conversations and DPO pairs, tokenized with the base's tokenizer, into the branch's data/ and
    branch.json (written last). Returns the branch directory, now holding its data."""
    from transformers import AutoTokenizer

    fail_if_injected("data")
    log("[branch 2/5] data: SFT conversations and DPO pairs")
    meta = read_meta(milestone)
    data = assemble_data(config, AutoTokenizer.from_pretrained(str(base)))
    branch.data_dir.mkdir(parents=True, exist_ok=True)
    digests = {name: write_jsonl(branch.data_file(name), getattr(data, name)) for name in DATA_FILES}
    write_json(branch.report, data.report)
    write_json(branch.record, {
        "milestone": str(milestone), "step": int(meta.get("step", 0)), "tokens_seen": meta.get("tokens_seen"),
        "run_dir": meta.get("config", {}).get("run_dir"), "base": str(base), "config": config.model_dump(mode="json"),
        "data_digests": digests, "device": _device(config)})
    log(f"      {data.report['totals']}")
    return branch


def train_sft(base: Path, branch: BranchDir, config: BranchConfig, log=print) -> Path:
    """3. SFT of the base on the branch's conversations, into the branch's sft/."""
    from branch.training import run_sft

    fail_if_injected("sft")
    if stage_complete(branch.sft_dir):
        log(f"[branch 3/5] SFT already complete: {branch.sft_dir}")
        return branch.sft_dir
    _threads(config)
    rows = branch.read_data("sft")
    log(f"[branch 3/5] SFT on {len(rows)} conversations → {branch.sft_dir}")
    with _recording("sft", branch) as callbacks:
        return run_sft(base, rows, branch.sft_dir, config.sft, _device(config), config.seed, _system_prompt(branch),
                       callbacks, log=log)


def train_dpo(sft: Path, branch: BranchDir, config: BranchConfig, log=print) -> Path:
    """4. DPO of the SFT model on the branch's training pairs, into the branch's dpo/."""
    from branch.training import run_dpo

    fail_if_injected("dpo")
    if stage_complete(branch.dpo_dir):
        log(f"[branch 4/5] DPO already complete: {branch.dpo_dir}")
        return branch.dpo_dir
    _threads(config)
    rows = branch.read_data("dpo_train")
    log(f"[branch 4/5] DPO on {len(rows)} pairs → {branch.dpo_dir}")
    with _recording("dpo", branch) as callbacks:
        return run_dpo(sft, rows, branch.dpo_dir, config.dpo, _device(config), config.seed, _system_prompt(branch),
                       callbacks, log=log)


def evaluate(base: Path, sft: Path, dpo: Path, branch: BranchDir, config: BranchConfig, log=print) -> dict:
    """5. Held-out pairs scored against the base, replies sampled; eval.json (written last). Returns its content."""
    from branch.evaluate import evaluate_branch
    from branch.training import quiet_libraries

    fail_if_injected("eval")
    if branch.complete:
        return branch.read_eval()
    _threads(config)
    log("[branch 5/5] evaluation on held-out pairs and prompts")
    quiet_libraries()
    started = time.time()
    result = evaluate_branch(base, sft, dpo, branch.read_data("dpo_heldout"), branch.read_data("heldout_prompts"),
                             config.eval, _device(config))
    milestone, step = exported_from(base)
    result["milestone"] = {"path": milestone, "step": step}
    result["eval_seconds"] = round(time.time() - started, 1)
    write_json(branch.eval_path, result)
    return result


def headline(result: dict) -> dict:
    """The few numbers of an eval.json worth a log line: per stage, preference accuracy, format, hedging."""
    return {stage: {key: result[stage][key] for key in HEADLINE} for stage in ("sft", "dpo")}


# -------------------------------------------------------------------------------------------------------------
# The branch


def one_process() -> None:
    """A branch is grown by one process on one device: its stages (the data, each model's directory, eval.json) are
    written by the process that grows it, under the branch's one lock. A multi-process launch (accelerate launch,
    torchrun: WORLD_SIZE > 1) is refused before anything starts, on every rank, with one line."""
    world = os.environ.get("WORLD_SIZE", "1")
    if world.isdigit() and int(world) > 1:
        rank = os.environ.get("RANK", os.environ.get("LOCAL_RANK", "?"))
        raise GenesisError(f"rank {rank} of {world}: a branch runs as one process on one GPU, not under accelerate "
                           f"launch or torchrun; run `genesis branch` (or branch-flow) plainly, with "
                           f"CUDA_VISIBLE_DEVICES naming the one GPU")


def grow(milestone: Path, config: BranchConfig, out: Path, log=print) -> dict:
    """Grow one branch off `milestone` into `out`; returns the eval.json content. A branch another process is
    growing is refused with one line; a complete one is left as it is; so is a multi-process launch (`one_process`)."""
    one_process()
    milestone = Path(milestone).resolve()
    check_milestone(milestone)  # before anything is written
    branch = BranchDir(Path(out).resolve())
    with branch.lock().held():
        if branch.complete:
            log(f"branch {branch.root} is already complete; nothing to do")
            return branch.read_eval()
        base = export_base(milestone, log)
        build_data(milestone, base, config, branch, log)
        sft = train_sft(base, branch, config, log)
        dpo = train_dpo(sft, branch, config, log)
        return evaluate(base, sft, dpo, branch, config, log)
