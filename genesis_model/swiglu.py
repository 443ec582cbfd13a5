"""SwiGLU on the fused w13 output, with a backward that reads each input once.

`FeedForward` computes silu(gate) · up from one (N, 2F) product, gate columns first. Autograd's backward returns
the (N, 2F) gradient as two halves joined along the last dimension. Inductor compiles that into one kernel over
the joined output. Each element of either half needs gate, up and the incoming gradient at its column, so gate,
up and the gradient are each read twice. Measured on an H200 (genesis-1b, micro-batch 16, bench/profile_step.py,
bench/results/fp8_profile.json): that kernel was 0.93–0.96 ms a layer, 19 ms of a 410 ms bf16 step, at 3 TB/s.
Here one Triton program reads a stretch of a row's gate, up and gradient once and writes both halves.

The forward stays plain torch ops, so Inductor still fuses it with what follows (FP8's amax and cast before w2).
On the CPU, or without Triton, `swiglu` is the plain expression and autograd's backward.

NOTE: hand-written rather than a library's: torch's own path is the kernel measured above, and Liger-Kernel's
SwiGLU (`LigerSiLUMulFunction`) takes gate and up as two tensors and returns their gradients apart, which the
fused w13 would join again in one more pass over the (N, 2F) gradient.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from genesis_model.decode_kernels import triton

if triton is not None:
    import triton.language as tl

# Whether a CUDA training step takes the kernel; read when the block is traced (tests/test_swiglu.py compares a
# model's gradients both ways).
USE_SWIGLU_KERNEL = True
# Triton's CPU interpreter (the tests): the kernel runs on CPU tensors. Read once, as Triton reads it when a kernel
# is defined.
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# Columns of one half a program covers, and its warps: 8 bf16 values (16 bytes) per thread per load.
SWIGLU_BLOCK = 1024
SWIGLU_WARPS = 4


if triton is not None:

    @triton.jit
    def _swiglu_backward_kernel(h_ptr, grad_ptr, out_ptr, F_DIM, BLOCK: tl.constexpr):
        """Row `program_id(0)`, columns [program_id(1)·BLOCK, +BLOCK) of each half:
        out[:, :F] = d gate, out[:, F:] = d up, with eager's bf16 roundings (silu(gate) and grad·up are rounded
        to the input dtype before their products, as autograd's saved and intermediate tensors are)."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < F_DIM
        h_row = h_ptr + row * 2 * F_DIM
        gate_raw = tl.load(h_row + cols, mask=mask, other=0.0)
        up_raw = tl.load(h_row + F_DIM + cols, mask=mask, other=0.0)
        grad_raw = tl.load(grad_ptr + row * F_DIM + cols, mask=mask, other=0.0)
        dtype = gate_raw.dtype
        gate = gate_raw.to(tl.float32)
        sig = tl.sigmoid(gate)
        silu = (gate * sig).to(dtype).to(tl.float32)
        grad = grad_raw.to(tl.float32)
        d_up = grad * silu
        d_silu = (grad * up_raw.to(tl.float32)).to(dtype).to(tl.float32)
        d_gate = d_silu * sig * (1.0 + gate * (1.0 - sig))
        out_row = out_ptr + row * 2 * F_DIM
        tl.store(out_row + cols, d_gate.to(dtype), mask=mask)
        tl.store(out_row + F_DIM + cols, d_up.to(dtype), mask=mask)

    @torch.library.triton_op("genesis::swiglu_backward", mutates_args=())
    def swiglu_backward(h13: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """(N, 2F) gate|up and the (N, F) gradient of silu(gate)·up → the (N, 2F) gradient of gate|up."""
        h13, grad = h13.contiguous(), grad.contiguous()
        rows, ffn_dim = grad.shape
        out = torch.empty_like(h13)
        grid = (rows, triton.cdiv(ffn_dim, SWIGLU_BLOCK))
        torch.library.wrap_triton(_swiglu_backward_kernel)[grid](h13, grad, out, ffn_dim, BLOCK=SWIGLU_BLOCK,
                                                                 num_warps=SWIGLU_WARPS)
        return out


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h13: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(h13)
        gate, up = h13.chunk(2, dim=-1)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (h13,) = ctx.saved_tensors
        shape = h13.shape
        return swiglu_backward(h13.reshape(-1, shape[-1]), grad.reshape(-1, shape[-1] // 2)).view(shape)


def swiglu_kernel_applies(h13: torch.Tensor) -> bool:
    """A step that will run backward, on a GPU (or on CPU tensors in Triton's interpreter, as the tests run it);
    decoding (no gradient) keeps the plain expression its graphs were measured with."""
    return USE_SWIGLU_KERNEL and triton is not None and (h13.is_cuda or _INTERPRETED) and h13.requires_grad


def swiglu(h13: torch.Tensor) -> torch.Tensor:
    """silu(gate) · up for h13 = gate | up along the last dimension (..., 2F) → (..., F)."""
    if swiglu_kernel_applies(h13):
        return _SwiGLU.apply(h13)
    gate, up = h13.chunk(2, dim=-1)
    return F.silu(gate) * up
