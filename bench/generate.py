"""KV-cache decoding speed of genesis-1b on one GPU, beside Hugging Face `generate`.

Random weights in bf16, batch 1, a 128-token prompt, 256 new tokens, greedy. Genesis uses its static cache
with the decode step compiled as a CUDA graph; HF runs its default dynamic cache, and a static cache with
`torch.compile` (default mode: "reduce-overhead" fails for HF, see shared/NOTES.md).

    python bench/generate.py --out bench/results/generate.json
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import RESULTS_DIR, environment, write_json  # noqa: E402
from genesis.config import load_model_config  # noqa: E402

PROMPT_TOKENS, NEW_TOKENS = 128, 256


def time_runs(fn, repeats=3) -> float:
    fn()  # warm-up (compilation, graph capture)
    fn()
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        produced = fn()
        torch.cuda.synchronize()
        assert produced == NEW_TOKENS, produced
        best = min(best, time.perf_counter() - start)
    return NEW_TOKENS / best


def bench_genesis(config, prompt) -> float:
    from genesis_model.generate import Generator, SamplingConfig
    from genesis_model.model import Transformer

    model = Transformer(config)
    model.init_weights(seed=0)
    model = model.to("cuda", torch.bfloat16)
    generator = Generator(model, max_seq_len=PROMPT_TOKENS + NEW_TOKENS, compile_decode=True)
    sampling = SamplingConfig(max_new_tokens=NEW_TOKENS, temperature=0)
    return time_runs(lambda: len(generator.generate(prompt, sampling)))


def bench_hf(config, prompt, static: bool) -> float:
    from transformers import LlamaConfig, LlamaForCausalLM

    from genesis_model.hf import hf_config_dict

    model = LlamaForCausalLM._from_config(LlamaConfig(**hf_config_dict(config)), torch_dtype=torch.bfloat16)
    model = model.cuda().eval()
    input_ids = torch.tensor([prompt], device="cuda")
    kwargs = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    if static:
        kwargs["cache_implementation"] = "static"
        model.forward = torch.compile(model.forward)

    def run():
        with torch.inference_mode():
            out = model.generate(input_ids, **kwargs)
        return out.shape[1] - input_ids.shape[1]

    return time_runs(run)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="genesis-1b")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "generate.json")
    args = parser.parse_args()
    config = load_model_config(args.model)
    prompt = torch.randint(3, config.vocab_size, (PROMPT_TOKENS,), generator=torch.Generator().manual_seed(0)).tolist()
    results = {**environment(), "gpu": torch.cuda.get_device_name(0), "model": args.model,
               "prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS}
    for key, fn in [("genesis_tok_s", lambda: bench_genesis(config, prompt)),
                    ("hf_tok_s", lambda: bench_hf(config, prompt, static=False)),
                    ("hf_static_compiled_tok_s", lambda: bench_hf(config, prompt, static=True))]:
        try:
            results[key] = round(fn(), 1)
        except Exception as err:
            traceback.print_exc()
            results[key + "_error"] = f"{type(err).__name__}: {str(err)[:300]}"
        torch._dynamo.reset()
        torch.cuda.empty_cache()
        print(key, results.get(key), flush=True)
        write_json(args.out, results)


if __name__ == "__main__":
    main()
