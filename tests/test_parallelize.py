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
from genesis.launch import free_port
from genesis_model.model import Transformer
from genesis_model.parallelize import parallelize


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
