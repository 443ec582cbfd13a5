"""Specifications of the Genesis decoder: exact architecture, deterministic init, fused loss, decoding."""

import pytest
import torch
import torch.nn.functional as F

from genesis.config import ModelConfig, load_model_config
from genesis.errors import ConfigError
from genesis_model.generate import Generator, SamplingConfig, generate_without_cache
from genesis_model.loss import fused_linear_cross_entropy
from genesis_model.model import Transformer


def small_config(**overrides) -> ModelConfig:
    fields = dict(vocab_size=301, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=64)
    return ModelConfig(**(fields | overrides))


def test_genesis_1b_preset_counts_exactly_1_002_522_624_parameters():
    with torch.device("meta"):
        model = Transformer(load_model_config("genesis-1b"))
    assert model.num_params() == 1_002_522_624


def test_presets_have_the_documented_sizes():
    with torch.device("meta"):
        small = Transformer(load_model_config("small")).num_params()
        tiny = Transformer(load_model_config("tiny")).num_params()
    assert 100e6 <= small <= 150e6
    assert 1e6 <= tiny <= 10e6


def test_unknown_preset_is_one_line_naming_the_choices():
    with pytest.raises(ConfigError) as err:
        load_model_config("genesis-7b")
    message = str(err.value)
    assert "genesis-7b" in message and "tiny" in message and "\n" not in message


def test_same_seed_gives_identical_weights_and_another_seed_does_not():
    config = small_config()
    first, second, third = Transformer(config), Transformer(config), Transformer(config)
    torch.manual_seed(999)  # the global RNG must not matter
    first.init_weights(seed=7)
    second.init_weights(seed=7)
    third.init_weights(seed=8)
    for (name, a), b, c in zip(first.state_dict().items(), second.state_dict().values(), third.state_dict().values()):
        assert torch.equal(a, b), name
    assert not torch.equal(first.layers["0"].attention.wqkv.weight, third.layers["0"].attention.wqkv.weight)


def test_residual_output_projections_get_the_depth_scaled_init():
    config = small_config(n_layers=8, dim=128, ffn_dim=256)
    model = Transformer(config)
    model.init_weights(seed=0)
    wo_std = model.layers["0"].attention.wo.weight.std().item()
    wqkv_std = model.layers["0"].attention.wqkv.weight.std().item()
    assert wqkv_std == pytest.approx(0.02, rel=0.05)  # truncation at ±3σ shrinks the std by ~1.3%
    assert wo_std == pytest.approx(wqkv_std / 4, rel=0.1)  # sqrt(2 · 8) = 4


def test_model_has_no_bias_parameters_and_ties_the_output_to_the_embedding():
    model = Transformer(small_config())
    assert not [name for name, _ in model.named_parameters() if "bias" in name]
    assert model.output is None and model.output_weight is model.tok_embeddings.weight


def test_initial_loss_is_near_log_vocab():
    model = Transformer(small_config())
    model.init_weights(seed=0)
    tokens = torch.randint(0, 301, (4, 33))
    loss = model(tokens[:, :-1], tokens[:, 1:])
    assert loss.item() == pytest.approx(torch.log(torch.tensor(301.0)).item(), rel=0.05)


@pytest.mark.parametrize("chunk_rows", [7, 64, 4096])
def test_fused_loss_matches_plain_cross_entropy_in_value_and_gradients(chunk_rows):
    torch.manual_seed(0)
    hidden = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 37, (50,))
    targets[::5] = -100  # ignored positions (e.g. prompt tokens in SFT)

    fused = fused_linear_cross_entropy(hidden, weight, targets, chunk_rows=chunk_rows)
    grad_hidden, grad_weight = torch.autograd.grad(fused * 3.0, (hidden, weight))
    plain = F.cross_entropy(hidden @ weight.T, targets, ignore_index=-100)
    ref_hidden, ref_weight = torch.autograd.grad(plain * 3.0, (hidden, weight))

    assert torch.allclose(fused, plain, atol=1e-12)
    assert torch.allclose(grad_hidden, ref_hidden, atol=1e-12)
    assert torch.allclose(grad_weight, ref_weight, atol=1e-12)


def test_fused_loss_with_fp32_master_weight_returns_its_gradient_in_fp32():
    # One GPU without FSDP: bf16 hidden states, the fp32 weight cast inside the loss. The gradient must come
    # back in fp32 (no cast left between the loss and the parameter) and equal the plain path's.
    torch.manual_seed(0)
    hidden = torch.randn(40, 16, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(37, 16, dtype=torch.float32, requires_grad=True)
    targets = torch.randint(0, 37, (40,))

    fused = fused_linear_cross_entropy(hidden, weight, targets, chunk_rows=16)
    grad_hidden, grad_weight = torch.autograd.grad(fused, (hidden, weight))
    plain = F.cross_entropy(F.linear(hidden, weight.to(torch.bfloat16)).float(), targets)
    ref_hidden, ref_weight = torch.autograd.grad(plain, (hidden, weight))

    assert grad_weight.dtype == torch.float32 and grad_hidden.dtype == torch.bfloat16
    assert torch.allclose(fused, plain, rtol=1e-3)
    assert torch.allclose(grad_weight, ref_weight, rtol=2e-2, atol=1e-3)
    assert torch.allclose(grad_hidden.float(), ref_hidden.float(), rtol=2e-2, atol=1e-3)


def test_prompt_longer_than_the_context_is_refused():
    model = Transformer(small_config(max_seq_len=16))
    with pytest.raises(ValueError, match="exceeds the context length 16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_greedy_decoding_with_kv_cache_equals_decoding_without_cache():
    # A large init makes the random model's greedy path wander instead of repeating one token.
    model = Transformer(small_config(init_std=0.3))
    model.init_weights(seed=3)
    prompt = [5, 17, 42, 9, 100]
    sampling = SamplingConfig(max_new_tokens=40, temperature=0)
    cached = Generator(model).generate(prompt, sampling)
    uncached = generate_without_cache(model, prompt, sampling)
    assert cached == uncached
    assert len(set(cached)) > 3


def test_each_cached_decode_step_gives_the_logits_of_the_whole_sequence_run_without_cache():
    # 4 query heads over 2 key/value heads: grouped-query attention over the cache, one token a step.
    model = Transformer(small_config(init_std=0.3))
    model.init_weights(seed=3)
    tokens = torch.tensor([[5, 17, 42, 9, 100, 7, 81, 3]])
    with torch.inference_mode():
        full = model(tokens)[0]
        model.setup_kv_cache(batch_size=1)
        prefill = model(tokens[:, :3], positions=torch.arange(3))[0]
        steps = [model(tokens[:, p : p + 1], positions=torch.tensor([p]))[0, -1] for p in range(3, 8)]
        model.clear_kv_cache()
    torch.testing.assert_close(prefill, full[:3], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.stack(steps), full[3:], atol=1e-5, rtol=1e-5)


def test_same_seed_gives_the_same_sample_and_another_seed_a_different_one():
    model = Transformer(small_config())
    model.init_weights(seed=3)
    prompt = [5, 17, 42]
    generator = Generator(model)
    first = generator.generate(prompt, SamplingConfig(max_new_tokens=30, temperature=1.0, seed=11))
    second = generator.generate(prompt, SamplingConfig(max_new_tokens=30, temperature=1.0, seed=11))
    other = generator.generate(prompt, SamplingConfig(max_new_tokens=30, temperature=1.0, seed=12))
    assert first == second
    assert first != other


def test_decoding_stops_at_a_stop_token_and_at_the_context_end():
    model = Transformer(small_config(max_seq_len=12))
    model.init_weights(seed=3)
    generator = Generator(model)
    free = generator.generate([1, 2, 3], SamplingConfig(max_new_tokens=50, temperature=0))
    assert len(free) == 12 - 3  # the context is full
    stop = free[2]
    stopped = generator.generate([1, 2, 3], SamplingConfig(max_new_tokens=50, temperature=0), stop_ids={stop})
    assert stopped == free[: free.index(stop) + 1]


def test_prompts_of_different_lengths_decoded_together_give_each_prompts_own_greedy_reply():
    model = Transformer(small_config(init_std=0.3))
    model.init_weights(seed=3)
    prompts = [[5, 17, 42, 9, 100], [7], [200, 3, 3, 81, 12, 6, 44, 19, 2]]
    sampling = SamplingConfig(max_new_tokens=20, temperature=0)
    alone = [Generator(model).generate(prompt, sampling) for prompt in prompts]
    together = Generator(model, batch_size=4).generate_batch(prompts, sampling)
    assert together == alone
    assert len({tuple(reply) for reply in together}) == 3


@pytest.mark.slow
def test_a_compiled_generator_decodes_as_the_eager_one_with_one_prefill_graph_for_every_prompt_length():
    from torch._dynamo.utils import counters

    model = Transformer(small_config(init_std=0.3))
    model.init_weights(seed=3)
    prompts = [[5, 17, 42, 9, 100], [200, 3, 3, 81, 12, 6, 44, 19, 2], list(range(3, 20))]
    sampling = SamplingConfig(max_new_tokens=8, temperature=0)
    eager = [Generator(model).generate(prompt, sampling) for prompt in prompts]
    torch._dynamo.reset()
    counters.clear()
    compiled = Generator(model, compile_decode=True)
    assert [compiled.generate(prompt, sampling) for prompt in prompts] == eager
    # the decode step and the prefill, compiled once each: a new prompt length is no new graph
    assert counters["stats"]["unique_graphs"] == 2


def test_each_row_of_a_batch_ends_at_its_own_stop_token():
    model = Transformer(small_config(init_std=0.3))
    model.init_weights(seed=3)
    prompts = [[5, 17, 42, 9, 100], [7, 8]]
    free = Generator(model, batch_size=2).generate_batch(prompts, SamplingConfig(max_new_tokens=20, temperature=0))
    stop = free[0][3]
    stopped = Generator(model, batch_size=2).generate_batch(
        prompts, SamplingConfig(max_new_tokens=20, temperature=0), stop_ids={stop})
    assert stopped[0] == free[0][: free[0].index(stop) + 1]
    assert stopped[1] == (free[1][: free[1].index(stop) + 1] if stop in free[1] else free[1])
