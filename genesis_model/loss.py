"""Cross-entropy fused with the output projection, computed in row chunks.

The naive path, `F.cross_entropy(hidden @ W.T, targets)`, materialises fp32 logits of shape (B·T, V): for
genesis-1b at micro-batch 8 that is 16,384 × 49,152 × 4 bytes = 3.2 GB, kept alive for the backward pass,
plus the same again for its gradient. Here each chunk of rows computes its logits, its loss and its gradients
with respect to the hidden states and the weight at once, then drops the logits. Only the (B·T, D) hidden
gradient and the (V, D) weight gradient survive to the backward pass, which just scales them by the
incoming gradient. Peak extra memory is one chunk of logits and its gradient (4,096 × 49,152 values).

The weight may be stored in a wider dtype than the hidden states (fp32 master weights computing in bf16 on one
GPU): it is cast here, and its gradient is accumulated and returned in its own dtype, so the output layer's
gradient is never rounded to bf16 and no cast sits between this function and the parameter.
"""

from __future__ import annotations

import torch

DEFAULT_CHUNK_ROWS = 4096


def _chunk_loss_and_logit_grad(logits, targets, valid):
    """Sum of losses over a chunk and d(sum)/d(logits) = softmax - one_hot(target), zero on ignored rows.

    `logits` may be bf16 (as the matmul produced them); the maths is in fp32 and the gradient comes back in
    the logits' dtype, ready for the next matmul. On CUDA this function is compiled, so reading the logits,
    the log-sum-exp and the gradient become two fused passes over the chunk, and no (rows, V) fp32 buffer is
    ever written to memory.
    """
    logits_dtype = logits.dtype
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    log_normaliser = torch.logsumexp(logits, dim=-1)
    target_logits = logits.gather(1, targets[:, None]).squeeze(1)
    loss_sum = ((log_normaliser - target_logits) * valid).sum()
    probs = torch.exp(logits - log_normaliser[:, None])
    one_hot = torch.zeros_like(probs).scatter_(1, targets[:, None], 1.0)
    grad_logits = (probs - one_hot) * valid[:, None]
    return loss_sum, grad_logits.to(logits_dtype)


_compiled_chunk = None
# Whether this build's CUDA matmuls take `out_dtype` (bf16 operands, fp32 result); None until first tried.
_mm_out_dtype_works: bool | None = None


def _accumulate_weight_grad(grad_weight, grad_logits_t, chunk_hidden, accumulate_dtype):
    """grad_weight (None before the first chunk) + grad_logits_t @ chunk_hidden, in `accumulate_dtype`.

    NOTE: on CUDA, with bf16 operands, the GEMM writes its fp32 sum straight into the accumulator (cuBLAS sums
    in fp32 anyway). The plain way, a bf16 product cast to fp32 and added, costs three more passes over the
    (V, D) gradient per chunk and rounds each chunk's product to bf16 first.
    """
    global _mm_out_dtype_works
    if chunk_hidden.is_cuda and chunk_hidden.dtype != accumulate_dtype and _mm_out_dtype_works is not False:
        try:
            if grad_weight is None:
                result = torch.mm(grad_logits_t, chunk_hidden, out_dtype=accumulate_dtype)
            else:
                result = torch.addmm(grad_weight, grad_logits_t, chunk_hidden, out_dtype=accumulate_dtype)
            _mm_out_dtype_works = True
            return result
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, TypeError):
            # NOTE: `out_dtype` matmuls came with torch 2.8; without them (decided once) the plain way.
            if _mm_out_dtype_works:
                raise
            _mm_out_dtype_works = False
    product = (grad_logits_t @ chunk_hidden).to(accumulate_dtype)
    return product if grad_weight is None else grad_weight.add_(product)


def _chunk_fn(device: torch.device):
    global _compiled_chunk
    if device.type != "cuda":
        return _chunk_loss_and_logit_grad
    if _compiled_chunk is None:
        _compiled_chunk = torch.compile(_chunk_loss_and_logit_grad, dynamic=False)
    return _compiled_chunk


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, chunk_rows):
        rows = hidden.shape[0]
        ctx.weight_dtype = weight.dtype
        weight = weight.to(hidden.dtype)
        valid = targets != ignore_index
        safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
        valid_count = valid.sum().clamp(min=1)
        need_hidden_grad, need_weight_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        chunk_loss_and_grad = _chunk_fn(hidden.device)

        accumulate_dtype = torch.promote_types(hidden.dtype, torch.float32)
        loss_sum = torch.zeros((), dtype=accumulate_dtype, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_hidden_grad else None
        grad_weight = None

        for start in range(0, rows, chunk_rows):
            end = min(start + chunk_rows, rows)
            chunk_hidden = hidden[start:end]
            logits = chunk_hidden @ weight.T  # (n, V) in the compute dtype; only this chunk is alive
            chunk_valid = valid[start:end].to(accumulate_dtype)
            chunk_loss, grad_logits = chunk_loss_and_grad(logits, safe_targets[start:end], chunk_valid)
            loss_sum += chunk_loss
            if need_hidden_grad or need_weight_grad:
                grad_logits = grad_logits.to(hidden.dtype)
                if need_hidden_grad:
                    grad_hidden[start:end] = grad_logits @ weight
                if need_weight_grad:
                    grad_weight = _accumulate_weight_grad(grad_weight, grad_logits.T, chunk_hidden, accumulate_dtype)

        ctx.save_for_backward(grad_hidden, grad_weight, valid_count)
        return loss_sum / valid_count

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight, valid_count = ctx.saved_tensors
        scale = grad_loss / valid_count
        hidden_out = (grad_hidden * scale.to(grad_hidden.dtype)) if grad_hidden is not None else None
        weight_out = (grad_weight * scale).to(ctx.weight_dtype) if grad_weight is not None else None
        return hidden_out, weight_out, None, None, None


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` against `targets`, skipping `ignore_index`.

    hidden (N, D), weight (V, D), targets (N,) int64. Same value and gradients as
    `F.cross_entropy(F.linear(hidden, weight.to(hidden.dtype)).float(), targets, ignore_index=ignore_index)`,
    with the weight's gradient in the weight's own dtype.
    """
    return _FusedLinearCrossEntropy.apply(hidden, weight, targets, ignore_index, chunk_rows)
