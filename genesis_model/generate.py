"""Text generation: static KV-cache decoding, sampling, and streaming.

One prefill pass writes the prompt's keys and values into a preallocated cache; each decode step then feeds
a single token at a fixed shape, so on GPU the step can be compiled once and replayed as a CUDA graph
(`compile_decode=True`, which compiles the prefill too, for any prompt length). Decoding is bandwidth-bound:
every new token reads all the weights once, so genesis-1b in bf16 (2 GB) is bounded near 1,650 tokens/s on an
H100 by memory bandwidth alone, and why `generate_batch`, which decodes many prompts in one pass, costs about as
much per step as one prompt.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from genesis.errors import GenesisError
from genesis_model.model import Transformer


@dataclass
class SamplingConfig:
    max_new_tokens: int = 128
    temperature: float = 0.8  # 0 = greedy
    top_k: int | None = 50
    top_p: float | None = 0.95
    seed: int | None = None


def sample_next(logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) fp32 → next tokens (B,)."""
    if sampling.temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < logits.shape[-1]:
        kth = torch.topk(logits, sampling.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p is not None and sampling.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens before it already cover top_p (always keep the most likely one).
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) > sampling.top_p
        drop = drop_sorted.scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class Generator:
    """Owns a model set up for decoding. Reuse one instance for many prompts: the cache and any compiled
    decode step are built once. `batch_size` > 1 sizes the cache for `generate_batch`."""

    def __init__(self, model: Transformer, max_seq_len: int | None = None, compile_decode: bool = False,
                 batch_size: int = 1, compile_mode: str = "reduce-overhead"):
        self.model = model.eval()
        self.max_seq_len = max_seq_len or model.config.max_seq_len
        self.batch_size = batch_size
        self.device = next(model.parameters()).device
        model.setup_kv_cache(batch_size=batch_size, max_seq_len=self.max_seq_len)
        self._decode, self._prefill = self._decode_step, self._prefill_step
        if compile_decode:
            # NOTE: "reduce-overhead" captures the step as a CUDA graph. The cache is updated in place with
            # index_copy_ at a tensor position, so every replay has the same addresses and shapes.
            # "max-autotune" also captures a CUDA graph, after benchmarking Triton's matmul templates per shape.
            self._decode = torch.compile(self._decode_step, mode=compile_mode, fullgraph=True)
            # NOTE: the prefill is compiled too, once for any prompt length (dynamic shapes; no CUDA graph, whose
            # shapes are fixed). Eager, genesis-1b's 128-token prefill took 12-23 ms on an H200: ~300 kernels
            # launched one by one from Python, most of the gap between a whole generate call and its decoding
            # (bench/generate.py's first_token_ms).
            self._prefill = torch.compile(self._prefill_step, dynamic=True)

    def _prefill_step(self, tokens: torch.Tensor, positions: torch.Tensor,
                      slot_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(tokens, positions=positions, slot_mask=slot_mask)[:, -1]

    def _decode_step(self, token: torch.Tensor, position: torch.Tensor,
                     slot_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(token, positions=position, slot_mask=slot_mask)[:, -1]

    @torch.inference_mode()
    def stream(
        self, prompt_ids: list[int], sampling: SamplingConfig, stop_ids: set[int] | None = None
    ) -> Iterator[int]:
        """Yield new token ids one at a time until `max_new_tokens` or a stop id (which is yielded too)."""
        max_new, generator = self._start([prompt_ids], sampling)
        stop_ids = stop_ids or set()

        prompt = torch.tensor([prompt_ids], dtype=torch.long, device=self.device)
        logits = self._prefill(prompt, torch.arange(len(prompt_ids), device=self.device))
        # NOTE: one position tensor advanced on the device: one tiny kernel a step instead of a copy from the
        # host's pageable memory (and views into one arange would differ in storage offset, which Dynamo may
        # guard on).
        position = torch.tensor([len(prompt_ids)], device=self.device)
        reader = _TokenReader(self.device, 1)
        token = sample_next(logits.float(), sampling, generator)
        for step in range(max_new):
            reader.fetch(token)
            last = step == max_new - 1
            if not last:
                # NOTE: the next step is queued before this token is read on the host, from the token still on
                # the device: the GPU goes on while Python yields, so a step costs the GPU's time, not the GPU's
                # plus a host round trip. After a stop id that one queued step is wasted work (its cache slot
                # lies beyond the reply, so nothing reads it).
                logits = self._decode(token.view(1, 1), position).clone()
                position += 1
            token_id = reader.read()[0]
            yield token_id
            if token_id in stop_ids or last:
                return
            token = sample_next(logits.float(), sampling, generator)

    def _start(self, prompts: list[list[int]], sampling: SamplingConfig) -> tuple[int, torch.Generator | None]:
        """Refuse prompts that are empty or leave no room to generate; return how many tokens the longest one
        leaves room for (at most `max_new_tokens`) and the seeded random generator, if any."""
        if any(not ids for ids in prompts):
            raise GenesisError("prompt: empty after tokenization; give at least one token of text")
        longest = max(len(ids) for ids in prompts)
        if longest >= self.max_seq_len:
            raise GenesisError(f"prompt: {longest} tokens does not fit the context of {self.max_seq_len}; shorten it")
        generator = None
        if sampling.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(sampling.seed)
        return min(sampling.max_new_tokens, self.max_seq_len - longest), generator

    def generate(self, prompt_ids: list[int], sampling: SamplingConfig, stop_ids: set[int] | None = None) -> list[int]:
        return list(self.stream(prompt_ids, sampling, stop_ids))

    @torch.inference_mode()
    def generate_batch(self, prompts: list[list[int]], sampling: SamplingConfig,
                       stop_ids: set[int] | None = None) -> list[list[int]]:
        """New token ids for up to `batch_size` prompts decoded together; each row ends at its first stop id
        (included) or after `max_new_tokens`.

        Prompts are left-padded to the longest one, so every row writes the same cache slot at each step and
        one forward pass serves the whole batch; `slot_mask` hides each row's padding. RoPE scores depend
        only on the distance between positions, so a row's shifted absolute positions do not change what it
        computes. All rows share the context left after the longest prompt: batch prompts of similar length.
        """
        if not prompts or len(prompts) > self.batch_size:
            raise GenesisError(f"generate_batch: {len(prompts)} prompts for a batch of {self.batch_size}; "
                               f"give 1 to {self.batch_size}")
        max_new, generator = self._start(prompts, sampling)
        longest = max(len(ids) for ids in prompts)
        stop = torch.tensor(sorted(stop_ids or set()), dtype=torch.long, device=self.device)

        # Rows beyond the prompts given repeat the first one; their tokens are dropped.
        rows = prompts + [prompts[0]] * (self.batch_size - len(prompts))
        tokens = torch.zeros(self.batch_size, longest, dtype=torch.long)
        slot_mask = torch.ones(self.batch_size, self.max_seq_len, dtype=torch.bool)
        for row, ids in enumerate(rows):
            tokens[row, longest - len(ids):] = torch.tensor(ids)
            slot_mask[row, : longest - len(ids)] = False
        tokens, slot_mask = tokens.to(self.device), slot_mask.to(self.device)

        logits = self._prefill(tokens, torch.arange(longest, device=self.device), slot_mask)
        position = torch.tensor([longest], device=self.device)  # advanced on the device, as in `stream`
        new_tokens = []
        finished = torch.zeros(self.batch_size, dtype=torch.bool, device=self.device)
        reader = _TokenReader(self.device, 1)
        token = sample_next(logits.float(), sampling, generator)
        for step in range(max_new):
            new_tokens.append(token)
            finished |= torch.isin(token, stop)
            reader.fetch(finished[: len(prompts)].all().view(1))
            if step == max_new - 1:
                break
            # NOTE: queued before the host learns whether every row has stopped (as in `stream`).
            logits = self._decode(token.view(-1, 1), position, slot_mask).clone()
            position += 1
            if reader.read()[0]:
                break
            token = sample_next(logits.float(), sampling, generator)

        sampled = torch.stack(new_tokens, dim=1).tolist()
        replies = []
        for row in sampled[: len(prompts)]:
            end = next((i + 1 for i, token_id in enumerate(row) if token_id in (stop_ids or ())), len(row))
            replies.append(row[:end])
        return replies


class _TokenReader:
    """Brings a few values from the device to the host without waiting for the work queued after them: a
    non-blocking copy into pinned memory, and an event to wait for that copy alone."""

    def __init__(self, device: torch.device, size: int):
        self.cuda = device.type == "cuda"
        self.host = torch.empty(size, dtype=torch.long, pin_memory=self.cuda)
        self.copied = torch.cuda.Event() if self.cuda else None

    def fetch(self, values: torch.Tensor) -> None:
        self.host.copy_(values.view(-1).long(), non_blocking=self.cuda)
        if self.cuda:
            self.copied.record()

    def read(self) -> list[int]:
        if self.cuda:
            self.copied.synchronize()
        return self.host.tolist()


@torch.inference_mode()
def generate_without_cache(
    model: Transformer, prompt_ids: list[int], sampling: SamplingConfig, stop_ids: set[int] | None = None
) -> list[int]:
    """Reference decoding that re-runs the whole sequence each step. Slow; for tests and parity checks."""
    model.clear_kv_cache()
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(sampling.seed) if sampling.seed is not None else None
    ids = list(prompt_ids)
    new: list[int] = []
    for _ in range(min(sampling.max_new_tokens, model.config.max_seq_len - len(prompt_ids))):
        logits = model(torch.tensor([ids], device=device))[:, -1]
        token_id = int(sample_next(logits.float(), sampling, generator).item())
        new.append(token_id)
        ids.append(token_id)
        if stop_ids and token_id in stop_ids:
            break
    return new


def stream_text(
    token_stream: Iterator[int], decode: Callable[[list[int]], str], skip_ids: set[int] | None = None
) -> Iterator[str]:
    """Turn a token stream into text pieces. Decodes the growing sequence and yields only the new suffix,
    so multi-token characters (byte fallback) appear once they are complete."""
    ids: list[int] = []
    emitted = ""
    for token_id in token_stream:
        if skip_ids and token_id in skip_ids:
            continue
        ids.append(token_id)
        text = decode(ids)
        if text.endswith("\ufffd") or len(text) <= len(emitted):
            continue  # an incomplete UTF-8 sequence (wait for the rest of its bytes), or nothing visible
        yield text[len(emitted):]
        emitted = text
