"""Specifications of how the model is laid out on one rank: the plain path (fp32 weights computing in bf16,
no FSDP) must compute what FSDP's bf16 parameter policy computes, so one GPU and many share their numerics and
a checkpoint moves between them without a jump in the loss."""

from __future__ import annotations

import copy
import os
from unittest import mock

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule

from genesis.config import OptimizerConfig, ParallelConfig, TrainConfig, load_model_config
from genesis.errors import ConfigError
from genesis_model.distributed import DistInfo
from genesis_model.launch import free_port
from genesis_model.model import Transformer
from genesis_model.optim import MasterWeightAdamW, build_optimizer
from genesis_model.parallelize import ParallelPlan, compute_copies, parallelize, plan_parallel, refresh_compute_copies


@pytest.fixture(scope="module")
def one_rank_mesh():
    # NOTE: the rendezvous address is restored afterwards: trainers that later tests start inherit this
    # environment, and a stale MASTER_PORT would make them all rendezvous on one port.
    with mock.patch.dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())):
        dist.init_process_group("gloo", rank=0, world_size=1)
        yield init_device_mesh("cpu", (1,))
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def trained_looking_model() -> Transformer:
    """The tiny model with norm gains moved off 1.0 as training moves them: at initialisation every gain is
    exactly representable in bf16 and would hide a difference in how the paths round them."""
    model = Transformer(load_model_config("tiny"))
    model.init_weights(seed=0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=generator))
    return model


def bf16_plan(one_rank: str = "plain", **fields) -> ParallelPlan:
    """One rank computing in bf16 on the CPU, a layout `plan_parallel` keeps for GPUs: built directly."""
    return ParallelPlan(param_dtype="bfloat16", fsdp=one_rank == "fsdp", **fields)


def batch(vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, vocab_size, (2, 65), generator=torch.Generator().manual_seed(1))
    return tokens[:, :-1], tokens[:, 1:]


def loss_after_one_step(model: Transformer, inputs, targets) -> tuple[float, float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    first = model(inputs, targets)
    first.backward()
    optimizer.step()
    with torch.no_grad():
        return first.item(), model(inputs, targets).item()


@pytest.mark.slow
@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_one_plain_rank_computes_what_fsdp_computes_in_bf16(one_rank_mesh, trained_looking_model, compile):
    inputs, targets = batch(trained_looking_model.config.vocab_size)
    results = {}
    for one_rank in ("plain", "fsdp"):
        model = parallelize(copy.deepcopy(trained_looking_model), one_rank_mesh, bf16_plan(one_rank, compile=compile))
        assert isinstance(model, FSDPModule) == (one_rank == "fsdp")
        results[one_rank] = loss_after_one_step(model, inputs, targets)
    (plain_before, plain_after), (fsdp_before, fsdp_after) = results["plain"], results["fsdp"]
    assert plain_before == fsdp_before  # the same forward, bit for bit
    # After one update they may part by rounding alone: the plain path accumulates the tied embedding's
    # gradient in fp32 where FSDP sums it in bf16 first.
    assert plain_after == pytest.approx(fsdp_after, rel=1e-4)
    assert plain_after < plain_before


@pytest.mark.slow
def test_whole_model_compile_gives_the_loss_of_per_block_compile(one_rank_mesh, trained_looking_model):
    inputs, targets = batch(trained_looking_model.config.vocab_size)
    losses = []
    for scope in ("blocks", "model"):
        model = parallelize(copy.deepcopy(trained_looking_model), one_rank_mesh,
                            bf16_plan(compile=True, compile_scope=scope))
        with torch.no_grad():
            losses.append(model(inputs, targets).item())
    assert losses[0] == losses[1]


def test_whole_model_compile_is_refused_where_fsdp_shards():
    for world_size, one_rank in ((1, "fsdp"), (2, "plain")):
        with pytest.raises(ConfigError, match="parallel.compile_scope 'model' needs one rank without FSDP") as err:
            plan_parallel(ParallelConfig(compile_scope="model", one_rank=one_rank), world_size, "cuda")
        assert "parallel.micro_steps 'replica'" in str(err.value)  # the way to one graph with several ranks


# ---------------------------------------------------------------------------------------------------------------
# Micro-steps on a plain replica beside FSDP's shards (parallel.micro_steps: replica, replica.py).


def test_a_replica_runs_the_micro_steps_as_one_plain_rank_would_and_fsdp_keeps_the_rest():
    plan = plan_parallel(ParallelConfig(micro_steps="replica"), world_size=2, device_type="cuda", grad_accum_steps=64)
    # The replica compiles as one plain rank does: one graph, unless checkpointing or FP8 asks for blocks.
    assert plan.fsdp and plan.replica and (plan.compile, plan.compile_scope) == (True, "model")
    # FSDP's own forward only evaluates: its weights are freed after each unit, nothing is kept gathered.
    assert plan.reshard_after_forward and not plan.accumulate_unsharded
    assert plan.record()["micro_steps"] == "replica"
    checkpointed = plan_parallel(ParallelConfig(micro_steps="replica", activation_checkpointing="selective"), 2, "cuda")
    assert checkpointed.compile_scope == "blocks"
    # One plain rank already steps a plain module: nothing to replicate; FSDP on one rank can have a replica.
    assert not plan_parallel(ParallelConfig(micro_steps="replica"), 1, "cuda").replica
    assert plan_parallel(ParallelConfig(micro_steps="replica", one_rank="fsdp"), 1, "cuda").replica
    assert plan_parallel(ParallelConfig(), 2, "cuda").record()["micro_steps"] == "fsdp"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_replica_trains_what_fsdp_trains_and_hands_the_gradients_to_the_shards(one_rank_mesh,
                                                                                 trained_looking_model, dtype):
    from genesis_model.replica import Replica, build_replica

    tokens = torch.randint(0, trained_looking_model.config.vocab_size, (3, 2, 65),
                           generator=torch.Generator().manual_seed(2))
    # fp32 as the CPU computes; bf16 as a GPU does, where FSDP gathers bf16 weights and sums gradients in fp32
    plan = ParallelPlan(fsdp=True, param_dtype=dtype)
    losses, states = {}, {}
    for mode in ("fsdp", "replica"):
        model = parallelize(copy.deepcopy(trained_looking_model), one_rank_mesh, plan)
        replica = Replica(model, build_replica(model.config, torch.device("cpu"), plan)) if mode == "replica" else None
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        losses[mode] = []
        for step in range(2):
            stepped = model
            if replica is not None:
                replica.pull_weights()
                stepped = replica.module
            for micro_batch in tokens:  # three micro-steps, accumulated
                loss = stepped(micro_batch[:, :-1], micro_batch[:, 1:])
                (loss / len(tokens)).backward()
                losses[mode].append(loss.item())
                if replica is not None:
                    replica.fold_gradients()
                    assert all(weight.grad is None for _, weight in replica.pairs)  # summed, then dropped
            if replica is not None:
                replica.push_gradients()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        states[mode] = {name: param.full_tensor() for name, param in model.named_parameters()}
    assert losses["replica"] == losses["fsdp"]  # the second step's micro-steps run on the updated weights
    for name, weight in states["fsdp"].items():
        assert torch.equal(states["replica"][name], weight), name


def test_a_replica_refuses_a_model_it_does_not_mirror(one_rank_mesh, trained_looking_model):
    from genesis_model.replica import Replica, build_replica

    plain = copy.deepcopy(trained_looking_model)
    with pytest.raises(ValueError, match="mirrors FSDP's dim-0 shards"):
        Replica(plain, build_replica(plain.config, torch.device("cpu"), ParallelPlan()))
    sharded = parallelize(copy.deepcopy(trained_looking_model), one_rank_mesh, ParallelPlan(fsdp=True))
    other = build_replica(load_model_config("tiny").model_copy(update={"n_layers": 1}), torch.device("cpu"),
                          ParallelPlan())
    with pytest.raises(ValueError, match="not the model's"):
        Replica(sharded, other)


# ---------------------------------------------------------------------------------------------------------------
# Master weights: bf16 compute copies of the fp32 weights, updated by MasterWeightAdamW.


def test_master_weight_adamw_is_adamw_and_keeps_each_compute_copy_equal_to_its_rounded_weight():
    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(shape)) for shape in ((7, 5), (5,), (3, 4, 2))]
    reference = [torch.nn.Parameter(w.detach().clone()) for w in weights]
    copies = {w: w.detach().to(torch.bfloat16) for w in weights}
    groups = lambda params: [{"params": params[:2], "weight_decay": 0.1}, {"params": params[2:], "weight_decay": 0.0}]
    ours = MasterWeightAdamW(groups(weights), copies, lr=1e-2, betas=(0.9, 0.95))
    torch_adamw = torch.optim.AdamW(groups(reference), lr=1e-2, betas=(0.9, 0.95), foreach=False)
    for step in range(5):
        for group in (*ours.param_groups, *torch_adamw.param_groups):
            group["lr"] = 1e-2 * (step + 1) / 5  # a schedule: the update reads the learning rate each step
        grads = [torch.randn(w.shape) for w in weights]
        for w, r, g in zip(weights, reference, grads):
            w.grad, r.grad = g.clone(), g.clone()  # fp32 gradients on the weights: AdamW's own case
        ours.step()
        torch_adamw.step()
        ours.zero_grad()
        torch_adamw.zero_grad()
    for w, r in zip(weights, reference):
        assert torch.allclose(w, r, rtol=1e-6, atol=1e-7)
        assert torch.equal(copies[w], w.detach().to(torch.bfloat16))
    # The state is AdamW's, so checkpoints move between the two optimizers.
    assert ours.state_dict()["state"].keys() == torch_adamw.state_dict()["state"].keys()
    assert set(ours.state_dict()["state"][0]) == set(torch_adamw.state_dict()["state"][0])


def test_master_weights_compute_the_plain_forward_and_train_like_fsdp(one_rank_mesh, trained_looking_model):
    inputs, targets = batch(trained_looking_model.config.vocab_size)
    before, after = {}, {}
    for mode in ("plain", "fsdp", "master"):
        model = parallelize(copy.deepcopy(trained_looking_model), one_rank_mesh,
                            bf16_plan("fsdp" if mode == "fsdp" else "plain", master_weights=mode == "master"))
        if mode == "master":
            optimizer = MasterWeightAdamW(model.parameters(), compute_copies(model), lr=1e-3)
            # Checkpoints see the fp32 weights only: the same keys and dtypes as the plain model's.
            state = model.state_dict()
            assert state.keys() == trained_looking_model.state_dict().keys()
            assert all(tensor.dtype == torch.float32 for tensor in state.values())
        else:
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        first = model(inputs, targets)
        first.backward()
        if mode == "master":
            assert all(weight.grad is None for weight in model.parameters())
            assert all(c.grad is not None and c.grad.dtype == torch.bfloat16 for c in compute_copies(model).values())
        optimizer.step()
        with torch.no_grad():
            before[mode], after[mode] = first.item(), model(inputs, targets).item()
    assert before["master"] == before["plain"] == before["fsdp"]  # the same forward, bit for bit
    # Gradients are bf16 as under FSDP's policy, so one update lands where FSDP's does, up to rounding.
    assert after["master"] == pytest.approx(after["fsdp"], rel=1e-4)
    assert after["master"] < before["master"]


def test_a_stale_compute_copy_is_refused_at_the_first_update(one_rank_mesh, trained_looking_model):
    model = parallelize(copy.deepcopy(trained_looking_model), one_rank_mesh, bf16_plan(master_weights=True))
    optimizer = MasterWeightAdamW(model.parameters(), compute_copies(model), lr=1e-3)
    with torch.no_grad():
        model.norm.weight.add_(1.0)  # e.g. a checkpoint load that forgot refresh_compute_copies
    inputs, targets = batch(model.config.vocab_size)
    model(inputs, targets).backward()
    with pytest.raises(RuntimeError, match="refresh_compute_copies"):
        optimizer.step()
    refresh_compute_copies(model)
    optimizer.step()


# ---------------------------------------------------------------------------------------------------------------
# The parallel plan: decided once, from the config, the world size, the device and the accumulation steps.


def test_master_weights_are_refused_where_fsdp_keeps_its_own_or_nothing_computes_in_bf16():
    # One line naming the field and the fix, for every way of asking for them where they cannot run.
    cases = [(ParallelConfig(master_weights=True), 2, r"parallel.master_weights is for one rank; with 2 ranks .* set "
                                                      r"parallel.master_weights=false"),
             (ParallelConfig(master_weights=True, one_rank="fsdp"), 1,
              "parallel.master_weights needs one_rank 'plain'"),
             (ParallelConfig(master_weights=True, param_dtype="float32"), 1,
              "parallel.master_weights needs one_rank 'plain' and param_dtype 'bfloat16'")]
    for parallel, world_size, message in cases:
        with pytest.raises(ConfigError, match=message) as err:
            plan_parallel(parallel, world_size, "cuda")
        assert "\n" not in str(err.value) and "set parallel.master_weights=false" in str(err.value)


def test_unset_parallel_settings_pick_the_fastest_measured_step_on_one_gpu_and_the_general_one_elsewhere():
    def decided(parallel: ParallelConfig, world_size: int = 1, device_type: str = "cuda") -> tuple[str, bool]:
        plan = plan_parallel(parallel, world_size, device_type)
        return plan.compile_scope, plan.master_weights

    # One plain GPU rank in bf16: bf16 compute copies and one compiled graph (the step BENCHMARKS.md measured).
    assert decided(ParallelConfig()) == ("model", True)
    # Several ranks (FSDP keeps its own masters; its hooks cannot live in one graph), or the CPU.
    assert decided(ParallelConfig(), world_size=2) == ("blocks", False)
    assert decided(ParallelConfig(), device_type="cpu")[1] is False
    # Combinations not measured on a GPU stay on the general path unless asked for explicitly.
    assert decided(ParallelConfig(activation_checkpointing="selective")) == ("blocks", False)
    assert decided(ParallelConfig(one_rank="fsdp")) == ("blocks", False)
    assert decided(ParallelConfig(param_dtype="float32"))[1] is False
    assert decided(ParallelConfig(master_weights=False, compile_scope="blocks")) == ("blocks", False)
    # What the run records in its meta.
    assert plan_parallel(ParallelConfig(), 1, "cuda").record() == {
        "compile_scope": "model", "master_weights": True, "compile": True, "param_dtype": "bfloat16", "float8": "off",
        "micro_steps": "plain"}


def test_the_plan_says_how_fsdp_reshards_and_the_cpu_computes():
    several = plan_parallel(ParallelConfig(), world_size=2, device_type="cuda", grad_accum_steps=4)
    assert several.fsdp and several.accumulate_unsharded and not several.reshard_after_forward
    lean = plan_parallel(ParallelConfig(accumulate_unsharded=False), 2, "cuda", grad_accum_steps=4)
    assert lean.fsdp and lean.reshard_after_forward and not lean.accumulate_unsharded
    assert plan_parallel(ParallelConfig(), 2, "cuda", grad_accum_steps=1).reshard_after_forward
    # One rank has nothing to free or to reduce; FSDP there only applies its bf16 policy.
    one = plan_parallel(ParallelConfig(one_rank="fsdp"), 1, "cuda", grad_accum_steps=4)
    assert one.fsdp and not one.reshard_after_forward and not one.accumulate_unsharded
    # The CPU computes in fp32 and compiles nothing, except that master weights exist only in bf16.
    cpu = plan_parallel(ParallelConfig(), 1, "cpu")
    assert (cpu.param_dtype, cpu.compile, cpu.fsdp) == ("float32", False, False)
    master = plan_parallel(ParallelConfig(master_weights=True), 1, "cpu", grad_accum_steps=2)
    assert master.param_dtype == "bfloat16" and master.fold_gradients


def test_the_optimizer_follows_the_plan_it_is_given(one_rank_mesh, trained_looking_model):
    plain = parallelize(copy.deepcopy(trained_looking_model), one_rank_mesh, bf16_plan())
    assert type(build_optimizer(plain, OptimizerConfig(), bf16_plan())) is torch.optim.AdamW
    plan = bf16_plan(master_weights=True)
    master = parallelize(copy.deepcopy(trained_looking_model), one_rank_mesh, plan)
    optimizer = build_optimizer(master, OptimizerConfig(), plan)
    assert isinstance(optimizer, MasterWeightAdamW) and set(optimizer.copies) == set(master.parameters())
    # A plan made for another world size is not applied.
    with pytest.raises(ValueError, match="plan is for 2 ranks"):
        parallelize(copy.deepcopy(trained_looking_model), one_rank_mesh, ParallelPlan(world_size=2, fsdp=True))


def test_build_decides_the_plan_once_and_lays_out_model_and_optimizer_by_it(one_rank_mesh, tmp_path):
    from genesis_model.build import build

    info = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), mesh=one_rank_mesh)
    config = TrainConfig(model=load_model_config("tiny"), data_dir=tmp_path / "data", run_dir=tmp_path / "run",
                         max_steps=1, device="cpu", grad_accum_steps=2,
                         parallel=ParallelConfig(master_weights=True, compile=False))
    parts = build(config, info, with_loader=False)
    assert parts.plan == plan_parallel(config.parallel, 1, "cpu", grad_accum_steps=2)
    assert parts.plan.master_weights and parts.plan.fold_gradients
    assert isinstance(parts.optimizer, MasterWeightAdamW) and parts.model.compute_dtype == torch.bfloat16
    assert parts.loader is None and not (tmp_path / "run").exists()
    # A plan decided by the caller is used as given.
    given = ParallelPlan()
    assert build(config, info, plan=given, with_loader=False).plan is given
    with pytest.raises(ConfigError, match="with 2 ranks"):
        build(config, DistInfo(rank=0, local_rank=0, world_size=2, device=torch.device("cpu"), mesh=one_rank_mesh),
              with_loader=False)
