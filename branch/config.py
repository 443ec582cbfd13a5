"""A branch recipe (configs/branch/*.yaml): data sources, SFT and DPO hyper-parameters, evaluation."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from branch.conversations import BranchSource
from genesis.config import StrictModel

DPO_LOSS_TYPES = {"sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"}


class StageRecipe(StrictModel):
    learning_rate: float = Field(gt=0)
    epochs: float = Field(default=1.0, gt=0)
    max_steps: int = Field(default=-1, ge=-1, description="-1 = run `epochs`")
    batch_size: int = Field(default=8, ge=1, description="per device")
    grad_accum_steps: int = Field(default=1, ge=1)
    max_length: int = Field(default=2048, gt=0)
    warmup_ratio: float = Field(default=0.03, ge=0, lt=1)
    lr_scheduler: Literal["cosine", "linear", "constant_with_warmup"] = "cosine"
    weight_decay: float = Field(default=0.0, ge=0)
    gradient_checkpointing: bool = False
    logging_steps: int = Field(default=10, ge=1)


class SFTRecipe(StageRecipe):
    packing: bool = Field(default=False, description="pack conversations into max_length rows (needs a varlen "
                                                     "attention kernel to keep them apart; see the recipe notes)")


class DPORecipe(StageRecipe):
    beta: float = Field(default=0.1, gt=0)
    loss_type: list[str] = Field(default_factory=lambda: ["sigmoid"])
    precompute_ref_log_probs: bool = False

    @field_validator("loss_type")
    @classmethod
    def _known_loss(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - DPO_LOSS_TYPES)
        if unknown:
            raise ValueError(f"unknown DPO loss {unknown}; choose from {sorted(DPO_LOSS_TYPES)}")
        return value


class EvalRecipe(StrictModel):
    max_prompts: int = Field(default=64, ge=1, description="held-out prompts sampled for format and hedging")
    max_pairs: int = Field(default=256, ge=1, description="held-out pairs scored for preference accuracy")
    max_new_tokens: int = Field(default=256, ge=1)
    temperature: float = Field(default=0.7, ge=0)
    top_k: int = Field(default=40, ge=0, description="0 = no top-k cut")
    top_p: float | None = Field(default=None, gt=0, le=1, description="nucleus cut; None = none")
    seed: int = 0
    replies_per_prompt: int = Field(default=1, ge=1, description="sampled replies per held-out prompt (format, "
                                    "hedging and curiosity are means over all of them)")
    batch_size: int = Field(default=16, ge=1, description="prompts sampled together (memory: a KV cache per "
                            "prompt for its prompt and max_new_tokens)")
    samples: int = Field(default=4, ge=0, description="replies shown side by side in eval.json")
    max_format_drop: float = Field(default=0.02, ge=0, le=1, description="a DPO model whose format adherence falls "
                                   "more than this below its SFT parent's is flagged: in eval.json "
                                   "(`format_check`), in the registry (never @latest or @champion by itself) and on "
                                   "the tree")


class BranchConfig(StrictModel):
    name: str = "branch"
    principles: Path | None = Field(default=None, description="principles YAML; default configs/principles.yaml")
    system_prompt: str | None = Field(default=None, description="use this instead of the rendered principles")
    system_prompt_style: Literal["full", "brief"] = "full"
    builtin_dialogues: bool = True
    sft_sources: list[BranchSource] = Field(default_factory=list)
    dpo_sources: list[BranchSource] = Field(default_factory=list)
    heldout_fraction: float = Field(default=0.2, gt=0, lt=1, description="share of preference-file prompts held "
                                    "out (built-in topics use the project's fixed split)")
    on_malformed: Literal["fail", "skip"] = "fail"
    seed: int = 42
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(default=None, ge=1, description="CPU threads for torch; None = torch's default")
    sft: SFTRecipe
    dpo: DPORecipe
    eval: EvalRecipe = EvalRecipe()

    @field_validator("sft_sources")
    @classmethod
    def _sft_formats(cls, value: list[BranchSource]) -> list[BranchSource]:
        for source in value:
            if source.format in ("preference", "rubric", "hedged_rewrite"):
                raise ValueError(f"sft source '{source.name}' has format {source.format}; SFT reads conversations")
        return value

    @field_validator("dpo_sources")
    @classmethod
    def _dpo_formats(cls, value: list[BranchSource]) -> list[BranchSource]:
        for source in value:
            if source.format not in ("preference", "rubric", "hedged_rewrite"):
                raise ValueError(f"dpo source '{source.name}' has format {source.format}; use preference, rubric or "
                                 f"hedged_rewrite")
        return value
