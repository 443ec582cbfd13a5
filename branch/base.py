"""The base of every branch off a milestone: the milestone exported once as a Hugging Face directory.

    <run_dir>/milestones/step_N  →  <run_dir>/hf/step_N   (RunDir.hf_export; fp32, what SFT trains from)

That one directory is the registered genesis-base version (lineage/record.py logs and registers it), the model
SFT starts from and the reference the evaluation scores against. Making it is the only time anything reads the
milestone's weights, so it is also the only time the milestone's sha256s are checked (export_checkpoint verifies
before it exports); everything after reads the milestone's meta.json at most.
"""

from __future__ import annotations

import json
from pathlib import Path

from genesis.errors import DataError
from genesis.run_dir import EXPORT_MARKER, RunDir, is_exported, read_meta, step_of


def check_chat_template(tokenizer_dir: Path | None, source: str) -> None:
    if tokenizer_dir is None or not (Path(tokenizer_dir) / "tokenizer.json").is_file():
        raise DataError(f"{source}: no tokenizer found for this checkpoint; keep its run's data_dir in place")
    config = Path(tokenizer_dir) / "tokenizer_config.json"
    template = Path(tokenizer_dir) / "chat_template.jinja"
    has_template = template.is_file() or (config.is_file() and json.loads(config.read_text()).get("chat_template"))
    if not has_template:
        raise DataError(f"{tokenizer_dir}: tokenizer has no chat template; retrain it with `genesis tokenizer train` "
                        f"(which writes the ChatML template) before branching")


def check_milestone(milestone: Path) -> dict:
    """The meta of a milestone a branch can grow from: complete, with a chat-capable tokenizer. Cheap: reads
    meta.json and the tokenizer's config, no weights and no checksums. One-line errors otherwise."""
    from genesis_model.inference import tokenizer_dir_of_checkpoint

    meta = read_meta(milestone)  # raises CheckpointError for a missing or incomplete one
    check_chat_template(tokenizer_dir_of_checkpoint(meta), str(milestone))
    return meta


def export_milestone(milestone: Path, log=print) -> Path:
    """The milestone's Hugging Face directory, exported (fp32) the first time anyone asks and reused after."""
    milestone = Path(milestone).resolve()
    run = RunDir.of_checkpoint(milestone)
    out = run.hf_export(milestone)
    if is_exported(out):
        # NOTE: reused as it is, whoever made it; an export from before branches shared it may be bf16.
        return out
    # The trunk's follower (registering the milestone) and every branch off it may ask at once: one exports,
    # the others wait and find it done.
    with run.registry_lock().held(wait=True):
        if not is_exported(out):
            import torch

            from genesis_model.inference import export_checkpoint

            log(f"export {milestone} → {out} (checksums first)")
            export_checkpoint(milestone, out, torch.float32)
    return out


def exported_from(base: Path) -> tuple[str, int]:
    """(milestone, step) an export came from, as its export marker names them."""
    marker = json.loads((Path(base) / EXPORT_MARKER).read_text())
    milestone = marker["source_checkpoint"]
    # NOTE: an export made before branches shared it names no step; the milestone's directory does.
    return milestone, int(marker.get("step") or step_of(Path(milestone).name))
