"""SFT and DPO with TRL on Hugging Face model directories.

Both stages train into `<out>.tmp` and rename it to `<out>` only when the model, tokenizer and training log
are saved, so a directory named `sft` or `dpo` is always complete. Device-dependent defaults are set here,
not left to TRL: its configs default to bf16 and gradient checkpointing, which on a CPU without bf16
instructions made a 4M-parameter SFT step ~10× slower (see ../shared/NOTES.md).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

from branch.config import DPORecipe, SFTRecipe, StageRecipe
from genesis.chat import EOS, IM_END, PAD, encode_chat
from genesis.errors import DataError
from genesis.run_dir import STAGE_MARKER, TRAIN_LOG
from genesis_model.hf import complete_export_dir



def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _common_args(config_cls, recipe: StageRecipe, output_dir: Path, device: str, seed: int) -> dict:
    import dataclasses

    cuda = device == "cuda"
    # transformers 5.2x renamed gradient_checkpointing to activation_checkpointing; the GPU image has an older 5.x.
    fields = {f.name for f in dataclasses.fields(config_cls)}
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    return dict(
        **{checkpointing: recipe.gradient_checkpointing},
        output_dir=str(output_dir),
        learning_rate=recipe.learning_rate,
        num_train_epochs=recipe.epochs,
        max_steps=recipe.max_steps,
        per_device_train_batch_size=recipe.batch_size,
        gradient_accumulation_steps=recipe.grad_accum_steps,
        warmup_steps=recipe.warmup_ratio,  # transformers ≥ 5: a float in [0, 1) is a ratio of total steps
        lr_scheduler_type=recipe.lr_scheduler,
        weight_decay=recipe.weight_decay,
        logging_steps=recipe.logging_steps,
        max_length=recipe.max_length,
        bf16=cuda and torch.cuda.is_bf16_supported(),
        use_cpu=not cuda,
        save_strategy="no",
        report_to=[],
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )


# What a logging step's line shows, in this order, and how; the rest of TRL's figures follow by name.
LINE_FIGURES = {"loss": "{:.4f}", "grad_norm": "{:.3f}", "learning_rate": "{:.2e}", "rewards/accuracies": "{:.3f}",
                "rewards/margins": "{:.3f}", "mean_token_accuracy": "{:.3f}", "epoch": "{:.2f}"}


def log_line(stage: str, step: int, max_steps: int, logs: dict) -> str:
    """TRL's figures of one logging step as one Genesis line: `sft step 10/46: loss 5.4120, grad_norm 0.843, ...`."""
    def shown(name, value):
        try:
            return LINE_FIGURES.get(name, "{:.4g}").format(float(value))
        except (TypeError, ValueError):
            return str(value)

    names = [name for name in LINE_FIGURES if name in logs] + sorted(name for name in logs if name not in LINE_FIGURES)
    return f"{stage} step {step}/{max_steps}: " + ", ".join(f"{name} {shown(name, logs[name])}" for name in names)


def _quiet_trainer(trainer, stage: str, log) -> None:
    """The trainer's figures go to `log` as one line per logging step, in place of transformers' raw dict prints
    (PrinterCallback, added because tqdm is off)."""
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    class LogLines(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or not state.is_world_process_zero:
                return
            if "train_runtime" in logs:  # the end-of-training figures
                log(f"{stage} done in {float(logs['train_runtime']):.0f} s: "
                    + log_line(stage, state.global_step, state.max_steps,
                               {k: v for k, v in logs.items() if k != "train_runtime"}).split(": ", 1)[1])
            else:
                log(log_line(stage, state.global_step, state.max_steps, logs))

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(LogLines())


def quiet_libraries() -> None:
    """No progress bars from transformers (loading weights) or datasets (TRL's map/filter passes) in the logs, and
    none of the libraries' notes about their own internals (TRL calling a transformers API deprecated for v6,
    huggingface_hub finding no card metadata in the model directory it writes)."""
    import logging
    import warnings

    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("huggingface_hub.repocard").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r".*is deprecated and will be removed in v6", category=FutureWarning)


def _load_model(model_dir: Path, device: str):
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)


def _tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    tokenizer.pad_token = PAD
    return tokenizer


def _finish(trainer, tokenizer, tmp: Path, out: Path, stage: str, parent: Path, rows: int,
            system_prompt: str | None) -> Path:
    """Save model + tokenizer + log into tmp, mark complete, and rename into place."""
    model = trainer.model
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    # NOTE: a chat model ends its turn with <|im_end|>; generation must stop there as well as at EOS.
    model.generation_config.eos_token_id = [im_end, tokenizer.convert_tokens_to_ids(EOS)]
    model.generation_config.pad_token_id = tokenizer.convert_tokens_to_ids(PAD)
    trainer.save_model(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    for leftover in ("trainer", "training_args.bin"):
        target = tmp / leftover
        shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
    # The tokenizer as the parent has it (tokenizer.model included), the chat markers special, no BOS added, and
    # the system prompt the model was tuned with as the chat template's default: complete for transformers 4.x/5.x
    # and llama.cpp, not only for Genesis (whose stage marker below also names the prompt).
    complete_export_dir(tmp, tokenizer_source=parent, system_prompt=system_prompt)
    log = [row for row in trainer.state.log_history]
    (tmp / TRAIN_LOG).write_text(json.dumps(log, indent=1))
    # The system prompt the model was tuned with: `genesis generate --chat` uses it unless told otherwise.
    (tmp / STAGE_MARKER).write_text(json.dumps({"stage": stage, "parent": str(parent), "train_rows": rows,
                                                "steps": trainer.state.global_step, "system_prompt": system_prompt},
                                               indent=2))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def sft_examples(tokenizer, rows: list[dict]) -> list[dict]:
    """SFT rows tokenized the Genesis way (`genesis.chat.encode_chat`): the template's markers by id, what users
    and assistants wrote as text (a quoted "<|im_end|>" is its characters, as in pretraining), and the mask of
    the assistant tokens the loss is taken on. TRL takes `input_ids` as already processed."""
    examples = []
    for row in rows:
        ids, mask = encode_chat(tokenizer, row["messages"], assistant_mask=True)
        examples.append({"input_ids": ids, "assistant_masks": mask})
    return examples


def dpo_examples(tokenizer, rows: list[dict]) -> list[dict]:
    """DPO pairs tokenized the Genesis way: the prompt with the generation prompt, and each reply as the tokens
    that follow it in the whole conversation (TRL's own split, with markers from text never possible)."""
    examples = []
    for row in rows:
        prompt = encode_chat(tokenizer, row["prompt"], add_generation_prompt=True)
        example = {"prompt_ids": prompt}
        for key in ("chosen", "rejected"):
            whole = encode_chat(tokenizer, row["prompt"] + row[key])
            if whole[: len(prompt)] != prompt:
                raise DataError(f"DPO pair from {row.get('source', 'a source')}: the prompt's tokens are not a prefix "
                                f"of the conversation's; the chat template renders them differently")
            example[f"{key}_ids"] = whole[len(prompt):]
        examples.append(example)
    return examples


def _pretokenized_dpo_trainer():
    """TRL's DPOTrainer for a dataset already holding prompt_ids / chosen_ids / rejected_ids."""
    from trl import DPOTrainer

    class PretokenizedDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if args.max_length is not None and args.truncation_mode == "keep_start":
                # As TRL does: a prompt that fills max_length alone would leave no completion token to learn from.
                dataset = dataset.filter(lambda example: len(example["prompt_ids"]) < args.max_length)
            return dataset

    return PretokenizedDPOTrainer


def run_sft(base_dir: Path, rows: list[dict], out: Path, recipe: SFTRecipe, device: str, seed: int,
            system_prompt: str | None = None, callbacks: Sequence = (), log=print) -> Path:
    """Supervised fine-tuning on conversations ({"messages": [...]}) with assistant-only loss. `callbacks`:
    transformers TrainerCallbacks (the stage's recorder logs metrics as it trains); `log` gets one line per
    logging step."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    quiet_libraries()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = _tokenizer(base_dir)
    args = SFTConfig(
        **_common_args(SFTConfig, recipe, tmp / "trainer", device, seed),
        # NOTE: loss only on assistant tokens: the examples carry `assistant_masks` (the template's
        # {% generation %} block, from sft_examples), which TRL applies to the labels of a tokenized dataset.
        # assistant_only_loss asks TRL to build the mask itself and refuses tokenized rows.
        assistant_only_loss=False,
        eos_token=IM_END,
        packing=recipe.packing,
        dataset_num_proc=None,
    )
    dataset = Dataset.from_list(sft_examples(tokenizer, rows))
    trainer = SFTTrainer(model=_load_model(base_dir, device), args=args, train_dataset=dataset,
                         processing_class=tokenizer, callbacks=list(callbacks) or None)
    _quiet_trainer(trainer, "sft", log)
    trainer.train()
    return _finish(trainer, tokenizer, tmp, out, "sft", base_dir, len(rows), system_prompt)


def run_dpo(sft_dir: Path, rows: list[dict], out: Path, recipe: DPORecipe, device: str, seed: int,
            system_prompt: str | None = None, callbacks: Sequence = (), log=print) -> Path:
    """Direct preference optimisation from the SFT model; the reference model is the SFT directory. `callbacks`
    and `log`: as for run_sft."""
    from datasets import Dataset
    from trl import DPOConfig

    quiet_libraries()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = _tokenizer(sft_dir)
    args = DPOConfig(
        **_common_args(DPOConfig, recipe, tmp / "trainer", device, seed),
        beta=recipe.beta,
        loss_type=recipe.loss_type,
        precompute_ref_log_probs=recipe.precompute_ref_log_probs,
    )
    dataset = Dataset.from_list(dpo_examples(tokenizer, rows))
    # NOTE: the reference is loaded from the saved SFT directory explicitly (TRL would otherwise reload it
    # from the policy's `_name_or_path`, which is the same directory but implicit).
    trainer = _pretokenized_dpo_trainer()(model=_load_model(sft_dir, device), ref_model=_load_model(sft_dir, device), args=args,
                         train_dataset=dataset, processing_class=tokenizer, callbacks=list(callbacks) or None)
    _quiet_trainer(trainer, "dpo", log)
    trainer.train()
    return _finish(trainer, tokenizer, tmp, out, "dpo", sft_dir, len(rows), system_prompt)
