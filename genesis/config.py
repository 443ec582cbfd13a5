"""One typed configuration system for the CLI, the flows and the training engine.

Every config is a pydantic model with `extra="forbid"`, loaded from one YAML file under `configs/` and
optionally overridden from the command line with `dotted.key=value`. Validation errors become a single line
naming the file, the field and the fix (`ConfigError`), never a pydantic traceback.

Model presets live in `configs/model/<name>.yaml`; a training config names one (`model: genesis-1b`) or
inlines the fields. The resolved config is saved beside every run, so a run directory says exactly what ran.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from genesis.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent


def config_root() -> Path:
    """Where `configs/` lives: `$GENESIS_CONFIG_DIR`, else the repository the package was installed from."""
    return Path(os.environ.get("GENESIS_CONFIG_DIR", REPO_ROOT / "configs"))


class StrictModel(BaseModel):
    """Base of every Genesis config: unknown fields are errors, and assignments are validated too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


# --------------------------------------------------------------------------------------------------------------
# Model


class ModelConfig(StrictModel):
    """Architecture of a Llama-style decoder. Field names follow the model file, not Hugging Face."""

    name: str = "custom"
    vocab_size: int = Field(gt=0)
    dim: int = Field(gt=0, description="hidden size")
    n_layers: int = Field(gt=0)
    n_heads: int = Field(gt=0)
    n_kv_heads: int = Field(gt=0, description="key/value heads for grouped-query attention")
    ffn_dim: int = Field(gt=0, description="SwiGLU inner size")
    max_seq_len: int = Field(gt=0, description="context length")
    rope_theta: float = Field(default=10_000.0, gt=0)
    norm_eps: float = Field(default=1e-5, gt=0)
    tie_embeddings: bool = True
    init_std: float = Field(default=0.02, gt=0)

    @model_validator(mode="after")
    def _heads_divide(self) -> "ModelConfig":
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} must be divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} must be a multiple of n_kv_heads {self.n_kv_heads}")
        if (self.dim // self.n_heads) % 2:
            raise ValueError("head_dim (dim / n_heads) must be even for rotary embeddings")
        return self

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def fingerprint(self) -> str:
        """Hash of the fields that decide parameter shapes and numerics (not the display name)."""
        fields = self.model_dump(exclude={"name", "init_std"})
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------------------
# Training


class OptimizerConfig(StrictModel):
    lr: float = Field(default=3e-4, gt=0)
    min_lr: float = Field(default=3e-5, ge=0)
    warmup_steps: int = Field(default=500, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(default=1e-8, gt=0)
    weight_decay: float = Field(default=0.1, ge=0)
    decay_norms_and_embeddings: bool = Field(
        default=False, description="apply weight decay to norm gains and the embedding too"
    )
    grad_clip: float = Field(default=1.0, gt=0)
    fused: bool | None = Field(default=None, description="fused AdamW; None = on for CUDA, off on CPU")
    # The learning-rate schedule (genesis_model/optim.py `lr_at`), a pure function of the step and the config.
    schedule: Literal["cosine", "wsd"] = Field(
        default="cosine",
        description="'cosine': warmup, then cosine to min_lr at max_steps (a fixed-length run). 'wsd': "
                    "warmup-stable-decay for a trunk that grows: each cycle (ending at every "
                    "checkpoint.milestone_every) holds lr and every milestone is fully decayed (see cooldown)")
    cooldown: Literal["fork", "inline"] = Field(
        default="fork",
        description="wsd: how a milestone is cooled down. 'fork': the trunk stays at lr for good; at "
                    "milestone − decay_fraction·milestone_every the trainer saves the trunk, cools a copy of it "
                    "down to min_lr into the milestone over the same data, and goes on from the saved trunk (the "
                    "cool-down's steps are paid twice; the trunk never re-warms). 'inline': the trunk itself "
                    "cools into each milestone (and into max_steps) and re-warms after it")
    decay_fraction: float = Field(default=0.2, gt=0, le=1,
                                  description="wsd: the share of each cycle (milestone_every) spent cooling down")
    decay_shape: Literal["1-sqrt", "linear"] = Field(
        default="1-sqrt", description="wsd: the cool-down's shape (1-sqrt: Hägele et al. 2024's best)")
    rewarm_steps: int | None = Field(
        default=None, ge=1,
        description="steps from min_lr back to lr at the start of each later cycle (logged as an lr_rewarm "
                    "event); None = warmup_steps")
    extended_from: list[int] = Field(
        default_factory=list,
        description="the max_steps this run was extended from: each ends a cycle (decayed to min_lr) and the "
                    "next re-warms. Resuming with a larger max_steps that would raise the LR of a run whose "
                    "schedule already bent toward the old end (cosine) is refused without it")

    @model_validator(mode="before")
    @classmethod
    def _one_step_is_a_list(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("extended_from"), int):
            data = {**data, "extended_from": [data["extended_from"]]}
        return data

    @model_validator(mode="after")
    def _min_below_peak(self) -> "OptimizerConfig":
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr {self.min_lr} must not exceed lr {self.lr}")
        if any(step < 1 for step in self.extended_from):
            raise ValueError(f"extended_from {self.extended_from} must list steps ≥ 1 (the max_steps extended from)")
        return self


class CheckpointConfig(StrictModel):
    save_every: int = Field(default=1000, ge=0, description="steps between rolling checkpoints; 0 = never")
    keep_last: int = Field(default=3, ge=1, description="rolling checkpoints kept (milestones are never removed)")
    milestone_every: int = Field(default=20_000, ge=0, description="steps between immutable milestones; 0 = none")
    async_save: bool | None = Field(default=None, description="dcp.async_save; None = on for CUDA, off on CPU")
    archive_weights: bool = Field(
        default=False,
        description="also keep every checkpoint's weights as a bf16 weights-only checkpoint in <run_dir>/archive/ "
                    "(never pruned; loadable by generate, export-hf and serve), written after the checkpoint "
                    "completes, off the training thread for async saves")
    writer_threads: int = Field(default=8, ge=1, le=64,
                                description="files each rank writes in parallel per checkpoint (and reads back)")
    save_at_end: bool = True


class EvalConfig(StrictModel):
    every: int = Field(default=500, ge=0, description="steps between per-source validation; 0 = never")
    batches_per_source: int = Field(default=4, ge=1)
    holdout_docs_per_source: int = Field(default=32, ge=1, description="documents held out per source")


class StabilityConfig(StrictModel):
    """What a bad step means (genesis_model/callbacks.py `Stability`). A loss spike is a finite loss above the
    rolling mean + spike_sigma·σ of the last spike_window losses."""

    max_consecutive_nonfinite: int = Field(default=5, ge=1, description="stop after K skipped steps in a row")
    spike_window: int = Field(default=50, ge=5)
    spike_sigma: float = Field(default=6.0, gt=0)
    spike_policy: Literal["record", "skip", "rollback"] = Field(
        default="skip",
        description="on a loss spike: 'record' it and apply the update; 'skip' the update (as OLMo-core's "
                    "skip-step optimizer does); 'rollback': reload the newest complete checkpoint's weights and "
                    "optimizer and go on with the data after the spike (the reference post's remedy); a non-finite "
                    "streak then rolls back too instead of stopping")
    max_rollbacks: int = Field(default=3, ge=0, description="rollbacks allowed in one process before the run stops")
    probe_before_save: bool = Field(
        default=True,
        description="before each checkpoint, a forward-only loss of the weights being saved on the next "
                    "micro-batch (data position unchanged): a checkpoint is withheld unless that loss is finite, "
                    "under the spike threshold and under max_loss_factor·ln(vocab)")
    max_weight_norm_growth: float = Field(
        default=10.0, gt=1,
        description="weights whose global norm grew more than this factor since the last checkpoint (or the "
                    "start) are not saved: a finite but destructive update (a wild learning rate) shows there "
                    "while the loss can still look like a fresh model's")
    max_loss_factor: float = Field(
        default=1.5, gt=1,
        description="a loss above this multiple of ln(vocab_size), a uniform guess's loss, means broken weights")


class ParallelConfig(StrictModel):
    """How the engine lays out the model. NOTE: checked, and 'auto' and unset resolved, in one place only,
    `genesis_model.parallelize.plan_parallel`: whether a setting can run depends on the world size and device,
    which only the job knows."""

    param_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    reduce_dtype: Literal["bfloat16", "float32"] = "float32"
    compile: bool = True
    activation_checkpointing: Literal["none", "selective", "full"] = "none"
    compile_memory_budget: float = Field(
        default=1.0, gt=0, le=1,
        description="below 1, torch.compile's partitioner recomputes the cheapest ops in backward to keep "
                    "saved activations near this fraction of its default plan (parallelize.py)")
    one_rank: Literal["plain", "fsdp"] = Field(
        default="plain",
        description="on one rank: 'plain' keeps an unsharded module with fp32 weights computing in param_dtype; "
                    "'fsdp' wraps it in FSDP2 anyway, the multi-GPU code path (parallelize.py)")
    compile_scope: Literal["auto", "blocks", "model"] = Field(
        default="auto",
        description="compile each block ('blocks', fast to compile, any world size) or embedding-to-final-norm as "
                    "one graph ('model', one plain rank only; the faster bf16 step, BENCHMARKS.md); 'auto': 'model' "
                    "on one plain rank without activation checkpointing or FP8, 'blocks' otherwise")
    accumulate_unsharded: bool = Field(
        default=True,
        description="with several ranks and grad_accum_steps > 1: keep the bf16 weights and the fp32 gradients "
                    "unsharded from the first micro-step to the last, so each optimizer step does one all-gather "
                    "and one reduce-scatter instead of two all-gathers per micro-step; measured for genesis-1b at "
                    "micro-batch 1 on 2 GPUs: 1.5 GiB more per GPU; false is the lean mode for the tightest GPUs")
    micro_steps: Literal["fsdp", "replica"] = Field(
        default="fsdp",
        description="with FSDP: 'fsdp' runs every micro-step through FSDP's units and their hooks; 'replica' "
                    "gathers the weights once per optimizer step into a plain copy of the whole model on each rank, "
                    "runs the micro-steps there (compiled as one graph, no FSDP hook), and reduce-scatters its "
                    "gradients once into FSDP's shards, which the optimizer and checkpoints keep as before. For "
                    "micro-batch 1, where FSDP's per-block hooks leave the GPU waiting for the CPU; the replica's "
                    "bf16 weights and fp32 gradient sums take what FSDP's gathered weights take, plus one "
                    "micro-step's bf16 gradients (replica.py). Not yet measured on GPUs")
    master_weights: bool | None = Field(
        default=None,
        description="one rank without FSDP (one_rank 'plain'), bf16: the forward runs on bf16 copies of the fp32 "
                    "weights that the optimizer rewrites as it updates them, so no step casts weights or "
                    "gradients; gradients are bf16 (summed in fp32 over micro-steps), as under FSDP "
                    "(parallelize.py, optim.MasterWeightAdamW). Checkpoints are the same either way. Unset (auto): "
                    "on for one plain GPU rank computing in bf16 without activation checkpointing, the fastest "
                    "measured step (BENCHMARKS.md)")
    float8: Literal["off", "rowwise", "tensorwise"] = Field(
        default="off",
        description="FP8 training through torchao's float8 (a GPU with FP8 tensor cores: RTX 4090, H100, H200): "
                    "the blocks' matmuls run in float8 with dynamic scales per row ('rowwise', the more accurate) or "
                    "per tensor ('tensorwise', whose FSDP all-gathers also go in float8); the output projection and "
                    "the loss stay bf16. Weights, optimizer state and checkpoints are unchanged, so an FP8 run and "
                    "a bf16 run resume each other's checkpoints (parallelize.py)")

    @field_validator("float8", mode="before")
    @classmethod
    def _yaml_off_is_off(cls, value: Any) -> Any:
        # YAML 1.1 reads a bare `off` as false; `float8: off` is what a user writes (`on` stays refused: which
        # recipe would it be?).
        return "off" if value is False else value

    fsdp_unit_blocks: int = Field(
        default=1, ge=1,
        description="with several ranks: consecutive blocks sharded as one FSDP unit. FSDP runs Python hooks per "
                    "unit on every micro-step, which at micro-batch 1 can leave the GPU waiting for the CPU; larger "
                    "units mean fewer hooks, larger all-gathers and less overlap of the first gather and last "
                    "reduce-scatter (parallelize.py)")
    nccl_timeout_s: int = Field(
        default=600, gt=0,
        description="how long a rank waits for the others: a checkpoint save that takes longer ends the job with "
                    "one line (exit 4); every other collective gives up 30 s later (distributed.py)")


class ProfilingConfig(StrictModel):
    start_step: int = Field(default=0, ge=0, description="profile from this optimizer step (1-based); 0 = off")
    steps: int = Field(default=2, ge=1, description="consecutive optimizer steps profiled")
    trace: bool = Field(default=True, description="keep each rank's Chrome/Perfetto trace (tens of MB for "
                                                  "genesis-1b), beside the summary that is always written")


class BranchPlan(StrictModel):
    """How the trunk's milestones grow branches: read by the orchestration (the milestone event, its trigger, the
    milestone watcher, genesis_flow), never by the trainer. Saved in every checkpoint's meta.json with the rest of
    the config, so a milestone says how it is to be branched."""

    recipe: Path | None = Field(
        default=None,
        description="branch recipe, configs/branch/*.yaml (relative to the repository, or absolute), for each "
                    "milestone of this trunk; None: milestones are not branched automatically (the milestone "
                    "event still fires, and `genesis branch` / branch-flow with a recipe still work)")
    overrides: list[str] = Field(default_factory=list, description="dotted.key=value overrides of the recipe")
    work_pool: str = Field(
        default="genesis-process",
        description="the Prefect work pool whose branch-flow deployment grows this trunk's branches (the milestone "
                    "trigger and milestone-watcher launch them there). Give a GPU trunk a pool whose worker sees "
                    "other GPUs than the trunk's, or one with a concurrency limit of 1 that the trunk is on too, so a "
                    "branch waits for the trunk")
    beside_trunk: bool | None = Field(
        default=None,
        description="genesis_flow's own branches (its branch_milestones): grow each while the trunk trains (true) or "
                    "after the trunk has finished (false, branches queued in milestone order). None: beside the trunk "
                    "when either trains on the CPU, after it otherwise (they would share the trunk's GPUs)")


def branch_plan_of(trunk_config: dict | None, source: str = "the trunk's config") -> BranchPlan:
    """The BranchPlan in a saved trunk config (a checkpoint meta.json's "config"); the default plan (no recipe) for
    a config saved before plans existed."""
    return validate(BranchPlan, dict((trunk_config or {}).get("branches") or {}), f"{source}: branches")


class TrainConfig(StrictModel):
    """One pretraining run. Token budget per optimizer step is
    micro_batch_size × model.max_seq_len × grad_accum_steps × world size."""

    model: ModelConfig
    data_dir: Path
    run_dir: Path
    seed: int = 1234
    device: Literal["auto", "cpu", "cuda"] = "auto"
    micro_batch_size: int = Field(default=1, ge=1)
    grad_accum_steps: int = Field(default=1, ge=1)
    max_steps: int = Field(gt=0, description="target step of this cycle; raise it to continue the trunk")
    seq_len: int | None = Field(default=None, description="training window; None = model.max_seq_len")
    log_every: int = Field(default=1, ge=1)
    optimizer: OptimizerConfig = OptimizerConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    eval: EvalConfig = EvalConfig()
    stability: StabilityConfig = StabilityConfig()
    parallel: ParallelConfig = ParallelConfig()
    profiling: ProfilingConfig = ProfilingConfig()
    env: dict[str, str] = Field(
        default_factory=dict, description="environment set before the process group starts (e.g. NCCL_P2P_DISABLE)"
    )
    verify_data_checksums: bool = Field(default=True, description="check every shard's sha256 before training")
    branches: BranchPlan = Field(default_factory=BranchPlan, description="how the milestones grow branches "
                                 "(orchestration only; the trainer ignores it)")

    @model_validator(mode="after")
    def _seq_len_fits(self) -> "TrainConfig":
        if self.seq_len is not None and self.seq_len > self.model.max_seq_len:
            raise ValueError(f"seq_len {self.seq_len} exceeds model.max_seq_len {self.model.max_seq_len}")
        return self

    @model_validator(mode="after")
    def _forked_cooldowns_need_milestones(self) -> "TrainConfig":
        optimizer = self.optimizer
        if optimizer.schedule == "wsd" and optimizer.cooldown == "fork" and not self.checkpoint.milestone_every:
            raise ValueError("optimizer.cooldown=fork cools each milestone off the trunk, and "
                             "checkpoint.milestone_every is 0 (no milestone, so nothing would ever decay): set "
                             "checkpoint.milestone_every, or optimizer.cooldown=inline to decay into max_steps")
        return self

    @property
    def window(self) -> int:
        return self.seq_len or self.model.max_seq_len

    def meaning(self) -> dict[str, Any]:
        """Fields whose change alters what a resumed run means; changing them requires an explicit reset."""
        return {
            "model": self.model.fingerprint(),
            "micro_batch_size": self.micro_batch_size,
            "window": self.window,
            "seed": self.seed,
        }


# --------------------------------------------------------------------------------------------------------------
# Loading


T = TypeVar("T", bound=BaseModel)


def _parse_override(item: str, source: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"{source}: override '{item}' is not key=value; write e.g. optimizer.lr=1e-4")
    key, raw = item.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw != "" else ""


def apply_overrides(data: dict[str, Any], overrides: list[str], source: str = "command line") -> dict[str, Any]:
    """Apply `a.b.c=value` overrides (values parsed as YAML scalars) to a nested dict, in place."""
    for item in overrides:
        keys, value = _parse_override(item, source)
        node = data
        for key in keys[:-1]:
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"{source}: override '{item}': '{key}' is not a section")
            node = child
        node[keys[-1]] = value
    return data


def read_yaml(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found; pass an existing YAML file (see configs/)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} is not valid YAML ({getattr(err, 'problem', err)}); fix the syntax")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of fields, got {type(data).__name__}")
    return data


def resolve_model_preset(value: Any, source: str) -> Any:
    """`model: NAME` refers to configs/model/NAME.yaml; a mapping is used as is."""
    if isinstance(value, str):
        preset = config_root() / "model" / f"{value}.yaml"
        if not preset.is_file():
            known = sorted(p.stem for p in (config_root() / "model").glob("*.yaml"))
            raise ConfigError(f"{source}: unknown model preset '{value}'; choose one of {', '.join(known)}")
        data = read_yaml(preset)
        data.setdefault("name", value)
        return data
    return value


def format_validation_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    field = ".".join(str(part) for part in first["loc"]) or "(top level)"
    kind = first["type"]
    if kind == "extra_forbidden":
        fix = "remove it or check its spelling"
    elif kind == "missing":
        fix = "add it"
    else:
        fix = "correct the value"
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{source}: field '{field}': {first['msg']}; {fix}{more}"


def validate(cls: type[T], data: dict[str, Any], source: str) -> T:
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def load_config(cls: type[T], path: str | Path, overrides: list[str] | None = None) -> T:
    """Load `path` as `cls`, applying overrides; raises ConfigError with one line on any problem."""
    path = Path(path)
    data = read_yaml(path)
    has_model = "model" in cls.model_fields
    # Presets resolve before overrides, so `model.vocab_size=2048` can adjust a preset's field, and again
    # after, so `model=small` can swap the preset.
    if has_model and "model" in data:
        data["model"] = resolve_model_preset(data["model"], str(path))
    data = apply_overrides(data, overrides or [], source=str(path))
    if has_model and "model" in data:
        data["model"] = resolve_model_preset(data["model"], str(path))
    return validate(cls, data, str(path))


def load_model_config(name_or_path: str | Path) -> ModelConfig:
    """A preset name (`tiny`) or a YAML path."""
    candidate = Path(name_or_path)
    if candidate.suffix in {".yaml", ".yml"}:
        data = read_yaml(candidate)
        return validate(ModelConfig, data, str(candidate))
    return validate(ModelConfig, resolve_model_preset(str(name_or_path), "--model"), f"configs/model/{name_or_path}.yaml")


def dump_yaml(config: BaseModel) -> str:
    return yaml.safe_dump(json.loads(config.model_dump_json()), sort_keys=False)
