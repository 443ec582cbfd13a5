"""Training-step throughput of genesis-1b on one GPU: Genesis against Hugging Face LlamaForCausalLM.

Both run one optimizer step per micro-batch at T=2048 with fused AdamW. HF: `attn_implementation="sdpa"`,
bf16 autocast over fp32 weights, whole-model `torch.compile`. Genesis: the trainer's own model and optimizer,
built by `genesis_model.build` from the parallel settings given here (fp32 weights computing in bf16, either as
a plain module (`--one-rank plain`, the default on one GPU) or through FSDP2's bf16 parameter policy
(`--one-rank fsdp`, the multi-GPU path); per-block or whole-model compile (`--compile-scope`); bf16 compute
copies (`--master-weights`); the chunked fused linear + cross-entropy; AdamW without decay on norms and the
embedding).

    python bench/train_step.py --impl genesis hf --micro-batches 1 4 8 --out bench/results/train_step.json

Each run is appended to the JSON file with its command, git revision, GPU, torch version and date, so runs can be
split across several device calls; a configuration measured again keeps its earlier runs.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    H100_BF16_PEAK_TFLOPS,
    RESULTS_DIR,
    Stopwatch,
    command_line,
    environment,
    git_rev,
    measure_matmul_tflops,
    train_flops_per_token,
    write_json,
)
from genesis.config import load_model_config  # noqa: E402


def build_genesis(config, activation_checkpointing: str, compile: bool, memory_budget: float = 1.0,
                  one_rank: str = "plain", compile_scope: str = "blocks", master_weights: bool = False,
                  float8: str = "off"):
    """The trainer's model and optimizer, built as `genesis_model.train` builds them (`genesis_model.build`) from a
    training config holding these parallel settings; the step below is the trainer's without its data loader,
    gradient clipping and logging."""
    from genesis.config import ParallelConfig, TrainConfig
    from genesis_model.build import build
    from genesis_model.distributed import init_distributed

    info = init_distributed("cuda")
    parallel = ParallelConfig(compile=compile, activation_checkpointing=activation_checkpointing,
                              compile_memory_budget=memory_budget, one_rank=one_rank, compile_scope=compile_scope,
                              master_weights=master_weights, float8=float8)
    # NOTE: the data and run directories are never opened (no loader, no trainer). The optimizer is the config's
    # default: lr 3e-4, betas 0.9/0.95, weight decay 0.1, fused on CUDA.
    train_config = TrainConfig(model=config, data_dir="unused", run_dir="unused", max_steps=1, seed=0, device="cuda",
                               parallel=parallel)
    parts = build(train_config, info, with_loader=False)
    model, optimizer = parts.model, parts.optimizer

    def step(tokens, targets, mark=None):
        # `mark(phase)` after each phase lets bench/profile_step.py time the phases with CUDA events.
        loss = model(tokens, targets)
        if mark:
            mark("forward")
        loss.backward()
        if mark:
            mark("backward")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if mark:
            mark("optimizer")
        return loss

    return model, step


def build_hf(config, activation_checkpointing: str, compile: bool, memory_budget: float):
    import torch._functorch.config as functorch_config

    functorch_config.activation_memory_budget = memory_budget
    from transformers import LlamaConfig, LlamaForCausalLM

    from genesis_model.hf import hf_config_dict

    hf_config = LlamaConfig(**hf_config_dict(config))
    model = LlamaForCausalLM._from_config(hf_config, attn_implementation="sdpa", torch_dtype=torch.float32).cuda()
    if activation_checkpointing != "none":
        model.gradient_checkpointing_enable()
    forward = torch.compile(model) if compile else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)

    def step(tokens, targets):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = forward(input_ids=tokens, labels=targets).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return model, step


def run_one(impl, config, micro_batch, seq_len, steps, warmup, activation_checkpointing, compile, matmul_tflops,
            memory_budget, one_rank, compile_scope, master_weights=False, float8="off"):
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    torch.manual_seed(0)
    with Stopwatch() as build_time:
        if impl == "genesis":
            model, step = build_genesis(config, activation_checkpointing, compile, memory_budget, one_rank,
                                        compile_scope, master_weights, float8)
        else:
            model, step = build_hf(config, activation_checkpointing, compile, memory_budget)
    num_params = sum(p.numel() for p in model.parameters())
    batches = [torch.randint(0, config.vocab_size, (micro_batch, seq_len + 1), device="cuda") for _ in range(4)]

    with Stopwatch() as warm_time:
        for i in range(warmup):
            batch = batches[i % len(batches)]
            loss = step(batch[:, :-1], batch[:, 1:] if impl == "genesis" else batch[:, :-1])
        float(loss)
    torch.cuda.reset_peak_memory_stats()
    with Stopwatch() as timed:
        for i in range(steps):
            batch = batches[i % len(batches)]
            loss = step(batch[:, :-1], batch[:, 1:] if impl == "genesis" else batch[:, :-1])
        final_loss = float(loss)
    peak_gib = torch.cuda.max_memory_allocated() / 2**30
    tok_s = steps * micro_batch * seq_len / timed.seconds
    flops = train_flops_per_token(num_params, config.n_layers, config.dim, seq_len) * tok_s
    del model, step, batches
    gc.collect()
    torch.cuda.empty_cache()
    return {
        "impl": impl,
        "micro_batch": micro_batch,
        "activation_checkpointing": activation_checkpointing,
        "compile_memory_budget": memory_budget,
        **({"one_rank": one_rank, "compile_scope": compile_scope} if impl == "genesis" else {}),
        **({"master_weights": True} if master_weights else {}),
        **({"float8": float8} if float8 != "off" else {}),
        "tok_s": round(tok_s, 1),
        "mfu": round(flops / (H100_BF16_PEAK_TFLOPS * 1e12), 4),
        "mfu_vs_measured_matmul": round(flops / (matmul_tflops * 1e12), 4) if matmul_tflops else None,
        "peak_gib": round(peak_gib, 3),
        "act_gib_per_seq": round((peak_gib - 16 * num_params / 2**30) / micro_batch, 3),
        "num_params": num_params,
        "step_s": round(timed.seconds / steps, 4),
        "build_s": round(build_time.seconds, 1),
        "warmup_s": round(warm_time.seconds, 1),
        "final_loss": round(final_loss, 4),
    }


def apply_inductor_settings(settings: list[str]) -> dict:
    """Set `torch._inductor.config` entries given as KEY=VALUE (VALUE: true, false, an int, or a word) before
    anything compiles; returns what was set, for the runs' records."""
    import torch._inductor.config as inductor_config

    applied = {}
    for setting in settings:
        key, _, text = setting.partition("=")
        value = {"true": True, "false": False}.get(text.lower(), int(text) if text.lstrip("-").isdigit() else text)
        owner = inductor_config
        *parents, leaf = key.split(".")
        for parent in parents:
            owner = getattr(owner, parent)
        if not hasattr(owner, leaf):
            raise SystemExit(f"--inductor {setting}: torch._inductor.config has no {key}")
        setattr(owner, leaf, value)
        applied[key] = value
    return applied


def run_key(run: dict) -> tuple:
    """What makes two runs the same configuration. Genesis runs from before `one_rank` existed used FSDP on
    one rank with per-block compile."""
    variant = ((run.get("one_rank", "fsdp"), run.get("compile_scope", "blocks")) if run["impl"] == "genesis"
               else (None, None))
    return (run["impl"], run["micro_batch"], run.get("activation_checkpointing", "none"),
            run.get("compile_memory_budget", 1.0), *variant, run.get("master_weights", False),
            run.get("overlap_optimizer", False), run.get("float8", "off"),
            json.dumps(run.get("inductor", {}), sort_keys=True))  # overlap_optimizer: a variant measured on 2026-12-01, then removed


def run_key_sortable(run: dict) -> tuple:
    return tuple("" if part is None else str(part).zfill(4) for part in run_key(run))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="genesis-1b")
    parser.add_argument("--impl", nargs="+", default=["genesis", "hf"], choices=["genesis", "hf"])
    parser.add_argument("--micro-batches", nargs="+", type=int, default=[1, 4, 8])
    parser.add_argument("--ac", default="none", choices=["none", "selective", "full"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--memory-budget", type=float, default=1.0,
                        help="torch.compile's activation memory budget (parallel.compile_memory_budget)")
    parser.add_argument("--one-rank", default="plain", choices=["plain", "fsdp"], help="parallel.one_rank")
    parser.add_argument("--compile-scope", default="blocks", choices=["blocks", "model"],
                        help="parallel.compile_scope")
    parser.add_argument("--master-weights", action="store_true",
                        help="parallel.master_weights: bf16 compute copies, fp32 masters in MasterWeightAdamW")
    parser.add_argument("--float8", default="off", choices=["off", "rowwise", "tensorwise"],
                        help="parallel.float8: FP8 matmuls in the blocks through torchao")
    parser.add_argument("--inductor", nargs="+", default=[], metavar="KEY=VALUE",
                        help="torch._inductor.config settings for this process (e.g. triton.prefer_nd_tiling=true), "
                             "recorded in each run as `inductor`")
    parser.add_argument("--label", default=None, help="stored as the runs' `revision`, to tell code versions apart")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "train_step.json")
    args = parser.parse_args()

    inductor_settings = apply_inductor_settings(args.inductor)
    config = load_model_config(args.model)
    results = json.loads(args.out.read_text()) if args.out.is_file() else {"runs": []}
    results.update(environment())
    results["gpu"] = torch.cuda.get_device_name(0)
    results["model"] = args.model
    results["seq_len"] = config.max_seq_len
    results["matmul_tflops"] = round(measure_matmul_tflops(), 1)
    print(f"bf16 matmul 8192^3: {results['matmul_tflops']} TFLOP/s", flush=True)

    for impl in args.impl:
        for micro_batch in args.micro_batches:
            variant = ((args.one_rank, args.compile_scope, args.master_weights, args.float8) if impl == "genesis"
                       else (None, None))
            try:
                run = run_one(impl, config, micro_batch, config.max_seq_len, args.steps, args.warmup, args.ac,
                              not args.no_compile, results["matmul_tflops"], args.memory_budget, *variant)
            except Exception as err:  # a failed configuration (e.g. out of memory) is a result too
                traceback.print_exc()
                run = {"impl": impl, "micro_batch": micro_batch, "activation_checkpointing": args.ac,
                       "compile_memory_budget": args.memory_budget, "error": f"{type(err).__name__}: {str(err)[:300]}"}
                if impl == "genesis":
                    run.update(one_rank=args.one_rank, compile_scope=args.compile_scope,
                               **({"master_weights": True} if args.master_weights else {}),
                               **({"float8": args.float8} if args.float8 != "off" else {}))
                gc.collect()
                torch.cuda.empty_cache()
            if inductor_settings:
                run["inductor"] = inductor_settings
            if args.label:
                run["revision"] = args.label
            # Each run says where and from what it was measured; a configuration measured again keeps its earlier
            # runs (the table below prints them all).
            run.update(command=command_line("train_step.py"), git_rev=git_rev(), gpu=results["gpu"],
                       torch=results["torch"], date=results["date"])
            results["runs"].append(run)
            write_json(args.out, results)
            print(json.dumps(run), flush=True)

    print(f"\n{'impl':8} {'variant':13} {'mb':>3} {'ac':>9} {'budget':>6} {'tok/s':>9} {'MFU':>6} {'peak GiB':>9} "
          f"{'act/seq':>8}")
    for r in sorted(results["runs"], key=run_key_sortable):
        variant = (f"{r.get('one_rank', 'fsdp')}/{r.get('compile_scope', 'blocks')}"
                   f"{'+mw' if r.get('master_weights') else ''}{'+ov' if r.get('overlap_optimizer') else ''}"
                   f"{'+' + r['float8'] if r.get('float8') else ''}"
                   if r["impl"] == "genesis" else "")
        head = (f"{r['impl']:8} {variant:13} {r['micro_batch']:>3} {r.get('activation_checkpointing', 'none'):>9} "
                f"{r.get('compile_memory_budget') or 1.0:>6}")
        if "error" in r:
            print(f"{head} {r['error'][:60]}")
        else:
            print(f"{head} {r['tok_s']:>9.0f} {r['mfu']:>6.3f} {r['peak_gib']:>9.2f} {r['act_gib_per_seq']:>8.2f}")
    os.environ.pop("RANK", None)


if __name__ == "__main__":
    main()
