"""SwiGLU's one-pass backward kernel (genesis_model/swiglu.py) gives autograd's gradients.

The kernel is Triton; this box has no GPU, so it runs in Triton's CPU interpreter in a fresh process (see
tests/test_decode_kernels.py). The interpreter rounds fp32 to bf16 by truncation where a GPU rounds to nearest,
so the rounding-for-rounding check runs in fp16, which the interpreter rounds as a GPU does. On a GPU the kernel
runs inside the compiled blocks of bench/fp8.py and bench/train_step.py (BENCHMARKS "FP8 training").
"""

from __future__ import annotations

import torch
from test_decode_kernels import run_interpreted

from genesis_model import swiglu


def test_a_cpu_training_step_keeps_the_plain_expression_and_autograds_backward():
    h13 = torch.randn(2, 3, 16, requires_grad=True)
    assert not swiglu.swiglu_kernel_applies(h13)
    gate, up = h13.detach().chunk(2, dim=-1)
    assert torch.equal(swiglu.swiglu(h13), torch.nn.functional.silu(gate) * up)


def test_the_kernel_gives_autograds_gradients_in_fp32_and_eagers_roundings_in_fp16():
    result = run_interpreted("""
        import json, torch, torch.nn.functional as F
        from genesis_model import swiglu as sw
        torch.manual_seed(0)
        out = {}
        # 1,100 columns a half: not a multiple of the kernel's block; a 3-D batch and a 2-D one
        for dtype in (torch.float32, torch.float16):
            for shape in [(3, 5, 2 * 1100), (7, 2 * 96)]:
                h = (torch.randn(*shape) * 3).to(dtype)
                g = torch.randn(*shape[:-1], shape[-1] // 2).to(dtype)
                kernel = h.clone().requires_grad_(True)
                assert sw.swiglu_kernel_applies(kernel)
                y = sw.swiglu(kernel)
                y.backward(g)
                plain = h.clone().requires_grad_(True)
                gate, up = plain.chunk(2, dim=-1)
                z = F.silu(gate) * up
                z.backward(g)
                out[f"{str(dtype)[6:]} {len(shape)}-D"] = {
                    "forward_equal": bool(torch.equal(y, z)),
                    "max_diff": (kernel.grad.float() - plain.grad.float()).abs().max().item(),
                    "max_rel": ((kernel.grad.float() - plain.grad.float()).abs()
                                / plain.grad.float().abs().clamp(min=1e-2)).max().item(),
                    "equal_fraction": (kernel.grad == plain.grad).float().mean().item()}
        print(json.dumps(out))
    """)
    for case, figures in result.items():
        assert figures["forward_equal"], case
    for case in ("float32 3-D", "float32 2-D"):
        assert result[case]["max_rel"] < 1e-5, result[case]
    for case in ("float16 3-D", "float16 2-D"):
        # eager's roundings reproduced: all but a few elements to the bit, none off by more than one fp16 ulp
        assert result[case]["equal_fraction"] > 0.999, result[case]
        assert result[case]["max_rel"] < 2 ** -10, result[case]


def test_a_models_gradients_with_the_kernel_are_those_without_it():
    result = run_interpreted("""
        import json, torch
        from genesis.config import ModelConfig
        from genesis_model import swiglu
        from genesis_model.model import Transformer
        config = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=160, vocab_size=256,
                             max_seq_len=32)
        model = Transformer(config)
        model.init_weights(seed=0)
        tokens = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(1))

        def gradients(use_kernel):
            swiglu.USE_SWIGLU_KERNEL = use_kernel
            model.zero_grad(set_to_none=True)
            loss = model(tokens[:, :-1], tokens[:, 1:])
            loss.backward()
            return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters()}

        loss_kernel, with_kernel = gradients(True)
        loss_plain, without = gradients(False)
        worst = max(((with_kernel[n] - without[n]).abs().max() / without[n].abs().max()).item() for n in without)
        print(json.dumps({"same_loss": loss_kernel == loss_plain, "worst_rel": worst}))
    """)
    assert result["same_loss"]
    assert result["worst_rel"] < 1e-5
