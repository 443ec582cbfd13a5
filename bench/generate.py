"""KV-cache decoding speed of genesis-1b on one GPU, beside Hugging Face `generate` and Genesis's previous path.

Random weights in bf16, a 128-token prompt per row, 256 new tokens, greedy, at batch 1 (one prompt streamed) and
batch 8 / 32 (that many different prompts decoded together; tokens/s counts every row's tokens). Genesis uses
its static cache with the decode step compiled as a CUDA graph; HF runs its default dynamic cache, and a static
cache with `torch.compile` (default mode: "reduce-overhead" fails for HF, see shared/NOTES.md).

Each speed comes twice: the whole `generate` call (the prompt's prefill included, what a user waits for) and the
decoding alone (the tokens after the first over the time after it; the same split for HF).

Beside the speeds, what bounds them: the bytes one decode step reads (the bf16 weights once, the output
projection included, plus the KV cache), the GPU's copy bandwidth measured here, and the fraction of the bound
(bandwidth / bytes per step) each speed reaches; and the decode step's own GPU time (the CUDA graph replayed with
nothing between the replays), the floor of what the Python loop around it can reach.

    python bench/generate.py                              # Genesis, the anchor tree, HF; appended to generate.json
    python bench/generate.py --genesis-only --label anchor --json-out /tmp/anchor.json   # (run by the above)
    python bench/generate.py --batches 1 --kernels --skip-hf   # batch 1 with decode_kernels's switches varied

`--anchor TREE` runs the same Genesis measurements with the Genesis source tree TREE (an earlier revision) in a
subprocess first: the previous path, in the same call.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if os.environ.get("GENESIS_BENCH_TREE"):  # the anchor's own engine, ahead of this tree's
    sys.path.insert(0, os.environ["GENESIS_BENCH_TREE"])
sys.path.insert(1 if os.environ.get("GENESIS_BENCH_TREE") else 0, str(REPO))
from bench.common import RESULTS_DIR, append_run, environment, git_rev  # noqa: E402
from genesis.config import load_model_config  # noqa: E402

PROMPT_TOKENS, NEW_TOKENS = 128, 256
# --kernels: batch 1 with genesis_model.decode_kernels's switches set otherwise than by default, beside the default.
ALL_ON = {"USE_GEMV": True, "USE_FLASH_DECODE": True, "USE_FUSED_BLOCK": True, "USE_ROPE_CACHE": True}
KERNEL_VARIANTS = {
    "genesis_cublas_sdpa": {name: False for name in ALL_ON},
    "genesis_fused_block": {**ALL_ON, "USE_ROPE_CACHE": False},
    "genesis_all_kernels": ALL_ON,
}
CALL_STARTED = time.monotonic()


class CallTimeUp(BaseException):
    """SIGTERM (`timeout`, the device's limit) during a measurement: what was measured is still written."""


def _time_up(signum, frame):
    raise CallTimeUp(f"signal {signum}")


def best_seconds(run, tokens: int, repeats: int = 2) -> float:
    """The best of `repeats` timed calls of `run` (which returns how many tokens it made) after a warm-up."""
    run()  # warm-up: compilation, graph capture
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        produced = run()
        torch.cuda.synchronize()
        assert produced == tokens, (produced, tokens)
        best = min(best, time.perf_counter() - start)
    return best


def speeds(generate, batch: int) -> dict:
    """`generate(new_tokens)` timed for NEW_TOKENS and for 1 new token per row: tokens/s of the whole call
    (prompt's prefill included) and of the decoding alone, (NEW_TOKENS − 1) tokens a row over the difference.
    The same split for every engine measured, so that a slower or faster prefill does not count as decoding."""
    whole = best_seconds(lambda: generate(NEW_TOKENS), NEW_TOKENS * batch)
    first = best_seconds(lambda: generate(1), batch)
    return {"tok_s": round(NEW_TOKENS * batch / whole, 1), "first_token_ms": round(first * 1e3, 2),
            "decode_tok_s": round((NEW_TOKENS - 1) * batch / (whole - first), 1)}


def prompts_for(config, batch: int) -> list[list[int]]:
    rng = torch.Generator().manual_seed(batch)
    return torch.randint(3, config.vocab_size, (batch, PROMPT_TOKENS), generator=rng).tolist()


def genesis_model(config):
    from genesis_model.model import Transformer

    model = Transformer(config)
    model.init_weights(seed=0)
    return model.to("cuda", torch.bfloat16)


def bench_genesis(model, config, batch: int, mode: str = "reduce-overhead") -> dict:
    from genesis_model.generate import Generator, SamplingConfig

    generator = Generator(model, max_seq_len=PROMPT_TOKENS + NEW_TOKENS, compile_decode=True, batch_size=batch,
                          compile_mode=mode)
    prompts = prompts_for(config, batch)

    def generate(new_tokens: int) -> int:
        sampling = SamplingConfig(max_new_tokens=new_tokens, temperature=0)
        if batch == 1:
            return len(generator.generate(prompts[0], sampling))
        return sum(len(row) for row in generator.generate_batch(prompts, sampling))

    measured = speeds(generate, batch)
    # The decode step alone: the captured graph replayed back to back, no sampling, no host round trip.
    token = torch.full((batch, 1), 5, dtype=torch.long, device="cuda")
    position = torch.tensor([PROMPT_TOKENS], device="cuda")
    mask = torch.ones(batch, PROMPT_TOKENS + NEW_TOKENS, dtype=torch.bool, device="cuda") if batch > 1 else None
    with torch.inference_mode():
        step = (lambda: generator._decode(token, position)) if batch == 1 else (
            lambda: generator._decode(token, position, mask))
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(100):
            step()
        torch.cuda.synchronize()
    step_s = (time.perf_counter() - start) / 100
    model.clear_kv_cache()
    return {**measured, "decode_step_ms": round(step_s * 1e3, 4),
            "decode_step_tok_s": round(batch / step_s, 1)}


def bench_hf(config, batch: int, static: bool) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from genesis_model.hf import hf_config_dict

    model = LlamaForCausalLM._from_config(LlamaConfig(**hf_config_dict(config)), torch_dtype=torch.bfloat16)
    model = model.cuda().eval()
    input_ids = torch.tensor(prompts_for(config, batch), device="cuda")
    kwargs = dict(do_sample=False, pad_token_id=0)
    if static:
        kwargs["cache_implementation"] = "static"
        model.forward = torch.compile(model.forward)

    def generate(new_tokens: int) -> int:
        with torch.inference_mode():
            out = model.generate(input_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
        return (out.shape[1] - input_ids.shape[1]) * batch

    try:
        return speeds(generate, batch)
    finally:
        torch._dynamo.reset()
        torch.cuda.empty_cache()


def copy_bandwidth_gb_s() -> float:
    """Device-to-device copy of 4 GiB: bytes read + bytes written per second, best of 5."""
    source = torch.empty(2**31, dtype=torch.bfloat16, device="cuda")
    target = torch.empty_like(source)
    best = float("inf")
    for _ in range(5):
        torch.cuda.synchronize()
        start = time.perf_counter()
        target.copy_(source)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    del source, target
    torch.cuda.empty_cache()
    return 2 * 2**32 / best / 1e9


def bytes_per_step(config, model, batch: int) -> int:
    """What one decode step must read: every weight once in bf16 (the tied embedding once, as the output
    projection; the lookup reads one row), and each layer's keys and values over the cache."""
    weights = sum(p.numel() for p in model.parameters()) * 2
    cache = config.n_layers * 2 * batch * config.n_kv_heads * (PROMPT_TOKENS + NEW_TOKENS) * config.head_dim * 2
    return weights + cache


def run_genesis(config, batches: list[int], budget_s: float, mode: str = "reduce-overhead",
                out: dict | None = None) -> dict:
    """Genesis at each batch, written into `out` (a new dict if None) as each one ends."""
    out = {} if out is None else out
    model = genesis_model(config)
    for batch in batches:
        if time.monotonic() - CALL_STARTED > budget_s:
            out[f"batch_{batch}"] = {"skipped": "not enough of the call's time left"}
            continue
        try:
            out[f"batch_{batch}"] = {**bench_genesis(model, config, batch, mode),
                                     "bytes_per_step": bytes_per_step(config, model, batch)}
        except Exception as err:  # noqa: BLE001 - one failed measurement keeps the others
            traceback.print_exc()
            out[f"batch_{batch}"] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
        torch._dynamo.reset()
        print("genesis", batch, json.dumps(out[f"batch_{batch}"]), flush=True)
    return out


def measure(run: dict, config, args) -> None:
    """Every measurement the arguments ask for, each written into `run` as it ends."""
    run_genesis(config, args.batches, args.budget_s, out=run.setdefault("genesis", {}))
    if args.kernels:
        from genesis_model import decode_kernels

        for variant in args.variants:
            switches = KERNEL_VARIANTS[variant]
            with decode_kernels.switched(**switches):
                run[variant] = {"switches": {name: getattr(decode_kernels, name) for name in decode_kernels.SWITCHES}}
                run_genesis(config, [1], args.budget_s, out=run[variant])
    if args.coordinate_descent:
        import torch._inductor.config as inductor_config

        inductor_config.coordinate_descent_tuning = True
        run["genesis_coordinate_descent"] = run_genesis(config, args.batches, args.budget_s)
        inductor_config.coordinate_descent_tuning = False
    if args.max_autotune:
        run["genesis_max_autotune"] = run_genesis(config, args.batches, args.budget_s, "max-autotune")
    # HF's dynamic cache at every batch before its compiled static cache (minutes of compiling per batch), so
    # that a call's budget cuts the latter first.
    for key, static in [] if args.skip_hf else (("hf_dynamic", False), ("hf_static_compiled", True)):
        for batch in args.batches:
            name = f"{key}_batch_{batch}"
            if time.monotonic() - CALL_STARTED > args.budget_s:
                run[name] = {"skipped": "not enough of the call's time left"}
                continue
            try:
                run[name] = bench_hf(config, batch, static)
            except Exception as err:  # noqa: BLE001
                traceback.print_exc()
                run[name] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
            print(name, json.dumps(run[name]), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="genesis-1b")
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 8, 32])
    parser.add_argument("--anchor", type=Path, default=None, help="an earlier Genesis source tree, measured first")
    parser.add_argument("--anchor-rev", default=None)
    parser.add_argument("--anchor-batches", type=int, nargs="*", default=[1])
    parser.add_argument("--coordinate-descent", action="store_true",
                        help="also measure Genesis with Inductor's coordinate-descent kernel tuning")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--kernels", action="store_true",
                        help="also Genesis at batch 1 in each of --variants (decode_kernels's switches)")
    parser.add_argument("--variants", nargs="*", choices=list(KERNEL_VARIANTS), default=list(KERNEL_VARIANTS))
    parser.add_argument("--max-autotune", action="store_true",
                        help="also measure Genesis with the decode step compiled in mode 'max-autotune'")
    parser.add_argument("--genesis-only", action="store_true", help="(the anchor's subprocess) Genesis only")
    parser.add_argument("--json-out", type=Path, default=None, help="(with --genesis-only) where to write")
    parser.add_argument("--budget-s", type=float, default=540, help="start no measurement after this many seconds")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "generate.json")
    args = parser.parse_args()
    config = load_model_config(args.model)

    if args.genesis_only:
        args.json_out.write_text(json.dumps(run_genesis(config, args.batches, args.budget_s)))
        return

    run = {**environment(), "git_rev": git_rev(), "command": " ".join(sys.argv), "gpu": torch.cuda.get_device_name(0),
           "model": args.model, "prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS}
    run["copy_bandwidth_gb_s"] = round(copy_bandwidth_gb_s(), 1)
    print("copy bandwidth GB/s", run["copy_bandwidth_gb_s"], flush=True)
    if args.anchor:
        anchor_json = Path("/tmp/generate-anchor.json")
        env = {**os.environ, "GENESIS_BENCH_TREE": str(args.anchor.resolve())}
        result = subprocess.run([sys.executable, __file__, "--genesis-only", "--model", args.model, "--batches",
                                 *map(str, args.anchor_batches), "--json-out", str(anchor_json),
                                 "--budget-s", str(args.budget_s / 2)], env=env, capture_output=True, text=True)
        run["anchor"] = ({"git_rev": args.anchor_rev, **json.loads(anchor_json.read_text())} if result.returncode == 0
                         else {"git_rev": args.anchor_rev, "error": result.stderr[-1500:]})
        print("anchor", json.dumps(run["anchor"]), flush=True)
    signal.signal(signal.SIGTERM, _time_up)
    try:
        measure(run, config, args)
    except CallTimeUp as stop:
        # NOTE: a measurement cut short by the call's time limit costs only itself (a run stopped at 570 s in a
        # 600 s call lost every figure before it): the run is written with what it has.
        run["stopped"] = f"the call's time ran out ({stop}); the measurement under way then is missing"
        print(run["stopped"], flush=True)

    bound = run["copy_bandwidth_gb_s"] * 1e9
    rows = [(batch, row) for variant in ("genesis", *KERNEL_VARIANTS, "genesis_coordinate_descent",
                                         "genesis_max_autotune", "anchor")
            for batch in args.batches if (row := run.get(variant, {}).get(f"batch_{batch}", {})).get("tok_s")]
    for batch, row in rows:
        row["bytes_per_step"] = row.get("bytes_per_step") or run["genesis"].get(f"batch_{batch}", {}).get(
            "bytes_per_step")
        if row["bytes_per_step"]:
            row["fraction_of_bound"] = round(row["tok_s"] / batch * row["bytes_per_step"] / bound, 3)
            if row.get("decode_tok_s"):
                row["decode_fraction_of_bound"] = round(row["decode_tok_s"] / batch * row["bytes_per_step"] / bound, 3)
            row["bound_tok_s"] = round(bound / row["bytes_per_step"] * batch, 1)
    one = run["genesis"].get("batch_1", {})
    # `bound_fraction` is the name (#27); `fraction_of_bound` the name earlier runs wrote at the top level.
    # Both count the whole call, the prompt's prefill included; the `decode_` figures count the decoding alone.
    latest = {"genesis_tok_s": one.get("tok_s"), "bound_fraction": one.get("fraction_of_bound"),
              "fraction_of_bound": one.get("fraction_of_bound"),
              "genesis_decode_tok_s": one.get("decode_tok_s"),
              "decode_bound_fraction": one.get("decode_fraction_of_bound"),
              "hf_tok_s": run.get("hf_dynamic_batch_1", {}).get("tok_s"),
              "hf_decode_tok_s": run.get("hf_dynamic_batch_1", {}).get("decode_tok_s"),
              "hf_static_compiled_tok_s": run.get("hf_static_compiled_batch_1", {}).get("tok_s"),
              "gpu": run["gpu"], "command": run["command"], "git_rev": run.get("git_rev")}
    # The top level compares Genesis with HF measured in the same call: a call without both leaves the top level
    # of the last call that had them, and appends its run alone.
    same_call = latest["genesis_tok_s"] is not None and latest["hf_tok_s"] is not None
    # Within such a call, a figure it did not reach is written as null: no figure of an older call stays beside it.
    latest["latest_note"] = (f"every top-level figure from one call (git {run.get('git_rev')}); null: not measured "
                             "in that call (its budget)")
    append_run(args.out, run, latest if same_call else {})
    print(json.dumps(latest, indent=1))


if __name__ == "__main__":
    main()
