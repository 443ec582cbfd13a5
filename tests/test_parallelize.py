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

from genesis.config import load_model_config
from genesis_model.launch import free_port
from genesis_model.model import Transformer
from genesis_model.optim import MasterWeightAdamW
from genesis_model.parallelize import compute_copies, parallelize, refresh_compute_copies


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
        model = parallelize(copy.deepcopy(trained_looking_model), one_rank_mesh, param_dtype="bfloat16",
                            compile=compile, one_rank=one_rank)
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
        model = parallelize(copy.deepcopy(trained_looking_model), one_rank_mesh, param_dtype="bfloat16",
                            compile=True, compile_scope=scope)
        with torch.no_grad():
            losses.append(model(inputs, targets).item())
    assert losses[0] == losses[1]


def test_whole_model_compile_is_refused_where_fsdp_shards(one_rank_mesh, trained_looking_model):
    with pytest.raises(ValueError, match="compile_scope 'model' needs one rank without FSDP"):
        parallelize(copy.deepcopy(trained_looking_model), one_rank_mesh, compile=True, compile_scope="model",
                    one_rank="fsdp")


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
        model = parallelize(copy.deepcopy(trained_looking_model), one_rank_mesh, param_dtype="bfloat16",
                            compile=False, one_rank="fsdp" if mode == "fsdp" else "plain",
                            master_weights=mode == "master")
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
    model = parallelize(copy.deepcopy(trained_looking_model), one_rank_mesh, param_dtype="bfloat16", compile=False,
                        master_weights=True)
    optimizer = MasterWeightAdamW(model.parameters(), compute_copies(model), lr=1e-3)
    with torch.no_grad():
        model.norm.weight.add_(1.0)  # e.g. a checkpoint load that forgot refresh_compute_copies
    inputs, targets = batch(model.config.vocab_size)
    model(inputs, targets).backward()
    with pytest.raises(RuntimeError, match="refresh_compute_copies"):
        optimizer.step()
    refresh_compute_copies(model)
    optimizer.step()


def test_master_weights_are_refused_where_fsdp_keeps_its_own(one_rank_mesh, trained_looking_model):
    with pytest.raises(ValueError, match="master_weights needs one rank without FSDP"):
        parallelize(copy.deepcopy(trained_looking_model), one_rank_mesh, compile=False, one_rank="fsdp",
                    master_weights=True)


def test_unset_parallel_settings_pick_the_fastest_measured_step_on_one_gpu_and_the_general_one_elsewhere():
    from genesis.config import ParallelConfig
    from genesis.errors import ConfigError

    # One plain GPU rank in bf16: bf16 compute copies and one compiled graph (the step BENCHMARKS.md measured).
    assert ParallelConfig().resolved(world_size=1, device_type="cuda") == ("model", True)
    # Several ranks (FSDP keeps its own masters; its hooks cannot live in one graph), or the CPU.
    assert ParallelConfig().resolved(world_size=2, device_type="cuda") == ("blocks", False)
    assert ParallelConfig().resolved(world_size=1, device_type="cpu")[1] is False
    # Combinations not measured on a GPU stay on the general path unless asked for explicitly.
    assert ParallelConfig(activation_checkpointing="selective").resolved(1, "cuda") == ("blocks", False)
    assert ParallelConfig(one_rank="fsdp").resolved(1, "cuda") == ("blocks", False)
    assert ParallelConfig(param_dtype="float32").resolved(1, "cuda")[1] is False
    assert ParallelConfig(master_weights=False, compile_scope="blocks").resolved(1, "cuda") == ("blocks", False)
    # Asked for on several ranks, where FSDP keeps its own masters: one line naming the field and the fix.
    with pytest.raises(ConfigError, match=r"parallel.master_weights is for one rank; with 2 ranks .* set "
                                          r"parallel.master_weights=false"):
        ParallelConfig(master_weights=True).resolved(world_size=2, device_type="cuda")
