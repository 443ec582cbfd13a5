"""Engine commands: `genesis train`, `export-hf`, `export-gguf`, `import-hf` and `generate`. They import neither
Prefect nor MLflow (only `generate --model models:/...` reaches the registry), so they run on a bare GPU box."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from genesis.cli_help import examples


def cmd_train(args: argparse.Namespace) -> int:
    from genesis.config import TrainConfig, load_config

    # A bad config is one line before anything starts, on one rank or many.
    config = load_config(TrainConfig, args.config, args.overrides)
    if args.nproc > 1:
        from genesis_model.launch import run_torchrun, torchrun_args, trainer_program

        flags = []
        for flag in ("resume", "stop_at_step"):
            value = getattr(args, flag)
            if value is not None:
                flags += [f"--{flag.replace('_', '-')}", str(value)]
        flags += [f for f, on in (("--reset-optimizer", args.reset_optimizer), ("--reset-data", args.reset_data)) if on]
        # torchrun's agent runs in this process, so a failed job is one line from the rank that saw the cause,
        # and a signal to `genesis train` reaches the ranks through the agent.
        return run_torchrun(torchrun_args(args.nproc, *trainer_program(args.config, args.overrides, flags)))
    from genesis_model.train import exit_code, train

    return exit_code(lambda: train(config, resume=args.resume, stop_at_step=args.stop_at_step,
                                   reset_optimizer=args.reset_optimizer, reset_data=args.reset_data,
                                   config_source=args.config))


def _dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def cmd_export_hf(args: argparse.Namespace) -> int:
    from genesis_model.inference import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out_dir, dtype=_dtype(args.dtype), tokenizer_dir=args.tokenizer)
    has_tokenizer = (out / "tokenizer.json").is_file()
    print(f"exported {args.checkpoint} → {out}" + ("" if has_tokenizer else " (no tokenizer found; weights only)"))
    return 0


def cmd_export_gguf(args: argparse.Namespace) -> int:
    from genesis_model.gguf_export import export_gguf

    out = export_gguf(args.src_dir, args.out, args.type, log=lambda line: print(line, file=sys.stderr))
    print(f"exported {args.src_dir} → {out} ({args.type}, {out.stat().st_size / 2**20:.1f} MiB)")
    return 0


def cmd_import_hf(args: argparse.Namespace) -> int:
    from genesis_model.checkpoint import write_model_only_checkpoint
    from genesis_model.hf import import_hf

    model = import_hf(args.hf_dir)
    print(f"imported {args.hf_dir}: {model.config.n_layers} layers, {model.num_params():,} parameters")
    if args.checkpoint_out:
        meta = {"model_config": model.config.model_dump(), "model_fingerprint": model.config.fingerprint(),
                "tokenizer_sha256": None, "data_fingerprint": None, "meaning": None, "tokens_seen": 0,
                "step": 0, "source_hf_dir": str(Path(args.hf_dir).resolve())}
        path = write_model_only_checkpoint(model, Path(args.checkpoint_out), meta)
        print(f"wrote model-only checkpoint {path} (resume from it with --reset-optimizer)")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from genesis_model.prompt import prepare_prompt
    from genesis_model.generate import Generator, SamplingConfig, stream_text
    from genesis_model.inference import load_checkpoint, load_hf, load_tokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.checkpoint:
        if args.no_verify:
            print(f"note: {args.checkpoint}: digests not checked (--no-verify); a damaged file would change the "
                  f"output silently", file=sys.stderr)
        loaded = load_checkpoint(args.checkpoint, dtype=dtype, device=device, verify=not args.no_verify)
    elif args.hf:
        loaded = load_hf(args.hf, dtype=dtype, device=device)
    else:
        from lineage.registry import resolve_model_uri  # MLflow lives outside the engine

        loaded = load_hf(resolve_model_uri(args.model, args.tracking_uri), dtype=dtype, device=device)
    tokenizer = load_tokenizer(loaded.tokenizer_dir, loaded.source)
    prompt = prepare_prompt(tokenizer, args.prompt, args.chat, loaded.source, system=args.system)
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, seed=args.seed)
    generator = Generator(loaded.model, compile_decode=device == "cuda" and args.compile)
    stream = generator.stream(prompt.ids, sampling, stop_ids=prompt.stop_ids)
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    if not args.chat:
        sys.stdout.write(args.prompt)
    for piece in stream_text(stream, decode):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def register(sub) -> None:

    train = sub.add_parser(
        "train", help="pretrain (torchrun-compatible; --nproc N launches torchrun)",
        epilog=examples("genesis train --config configs/train/tiny-cpu.yaml run_dir=runs/tiny-cpu",
                        "genesis train --nproc 2 --config configs/train/tiny-cpu.yaml run_dir=runs/tiny-cpu --resume auto"))
    train.add_argument("--config", required=True, type=Path)
    train.add_argument("overrides", nargs="*", help="dotted.key=value")
    train.add_argument("--nproc", type=int, default=1, help="processes on this machine (torchrun --nproc_per_node)")
    train.add_argument("--resume", default=None, help="auto | CHECKPOINT_DIR")
    train.add_argument("--stop-at-step", type=int, default=None)
    train.add_argument("--reset-optimizer", action="store_true")
    train.add_argument("--reset-data", action="store_true",
                       help="resume on changed data (a new mixture, more shards, new sources): each source continues "
                            "from its own cursor, so documents already read are not read again while unread ones remain")
    train.set_defaults(handler=cmd_train)

    export = sub.add_parser("export-hf", help="write a trainer checkpoint as a transformers LlamaForCausalLM dir",
                            epilog=examples("genesis export-hf runs/demo/trunk/milestones/step_00000400 "
                                            "models/demo-base"))
    export.add_argument("checkpoint", type=Path)
    export.add_argument("out_dir", type=Path)
    export.add_argument("--tokenizer", type=Path, default=None, help="tokenizer dir (default: the run's data tokenizer)")
    export.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    export.set_defaults(handler=cmd_export_hf)

    gguf = sub.add_parser("export-gguf", help="write an exported HF directory (export-hf, a branch's sft/dpo) as a "
                          "GGUF file for llama.cpp",
                          epilog=examples("genesis export-gguf runs/demo/trunk/branches/step_00000400/dpo "
                                          "models/genesis-dpo.gguf --type q8_0"))
    gguf.add_argument("src_dir", type=Path, help="a Hugging Face model directory written by Genesis")
    gguf.add_argument("out", type=Path, help="the .gguf file to write")
    gguf.add_argument("--type", default="f16", choices=["f16", "bf16", "q8_0"], help="weight type (default f16)")
    gguf.set_defaults(handler=cmd_export_gguf)

    imp = sub.add_parser("import-hf", help="read a Llama-architecture HF model into the native model",
                         epilog=examples("genesis import-hf some/llama-dir --checkpoint-out "
                                         "runs/seed/checkpoints/step_00000000"))
    imp.add_argument("hf_dir", type=Path)
    imp.add_argument("--checkpoint-out", type=Path, default=None, help="write it as a model-only checkpoint")
    imp.set_defaults(handler=cmd_import_hf)

    gen = sub.add_parser(
        "generate", help="generate text from a checkpoint, an HF dir or a registered model",
        epilog=examples("genesis generate --model models:/genesis-dpo@champion --chat --prompt 'Why do we have seasons?'",
                        "genesis generate --checkpoint runs/demo/trunk/milestones/step_00000400 --prompt 'def '",
                        "genesis generate --hf models/demo-base --prompt 'The tree of life' --max-new-tokens 64"))
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path)
    source.add_argument("--hf", type=Path)
    source.add_argument("--model", help="models:/NAME@ALIAS or models:/NAME/VERSION from the MLflow registry")
    gen.add_argument("--tracking-uri", default=None, help="the registry --model is looked up in (default: "
                     "MLFLOW_TRACKING_URI or the project's SQLite store, runs/mlflow/mlflow.db)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.8)
    gen.add_argument("--top-k", type=int, default=50)
    gen.add_argument("--top-p", type=float, default=0.95)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    gen.add_argument("--system", default=None, help="system prompt for --chat (default: the one the model was tuned "
                     "with, else configs/principles.yaml's; '' for none)")
    gen.add_argument("--no-compile", dest="compile", action="store_false", help="skip CUDA-graph decoding")
    gen.add_argument("--no-verify", action="store_true",
                     help="skip checking a --checkpoint's files against its marker's digests (said on stderr)")
    gen.set_defaults(handler=cmd_generate)
