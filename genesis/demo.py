"""`genesis demo`: the whole pipeline on a fresh CPU machine, in minutes, with nothing downloaded.

built-in corpus → tokenizer → token shards → tiny model pretrained on 2 gloo ranks under torchrun, reaching
2 milestones → each milestone exported as a Hugging Face model → a sample from each → a summary.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from genesis.config import REPO_ROOT, TrainConfig, load_config


def run_pretraining(config_path: Path, overrides: list[str], nproc: int, run_dir: Path, resume: bool = True) -> None:
    """Launch the trainer under torchrun as a child process group and stream its output."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(_free_port()), "-m", "genesis_model.train", "--config", str(config_path), *overrides]
    if resume:
        command += ["--resume", "auto"]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    result = subprocess.run(command, cwd=REPO_ROOT, env=env)
    if result.returncode != 0:
        from genesis.errors import GenesisError

        raise GenesisError(f"pretraining failed (exit {result.returncode}); see the log above and "
                           f"{run_dir / 'events.jsonl'}, then rerun to resume from the last checkpoint")


def sample_text(hf_dir: Path, prompt: str, max_new_tokens: int = 40) -> str:
    from genesis_model.generate import Generator, SamplingConfig
    from genesis_model.inference import load_hf, load_tokenizer

    loaded = load_hf(hf_dir)
    tokenizer = load_tokenizer(loaded.tokenizer_dir, str(hf_dir))
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    new = Generator(loaded.model).generate(ids, SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.7,
                                                               top_k=40, seed=0), stop_ids={tokenizer.eos_token_id, 2})
    return prompt + tokenizer.decode(new, skip_special_tokens=True)


def demo(workdir: Path, nproc: int = 2) -> dict:
    from data_prep.pipeline import prepare
    from data_prep.sources import CorpusConfig
    from genesis_model.checkpoint import list_checkpoints
    from genesis_model.hf import export_hf
    from genesis_model.inference import load_checkpoint
    from genesis_model.loader import TokenLoader, unigram_cross_entropy

    started = time.time()
    workdir = workdir.resolve()
    data_dir, run_dir, models_dir = workdir / "data", workdir / "trunk", workdir / "models"
    print(f"[1/4] data: built-in corpus → {data_dir}", flush=True)
    corpus = load_config(CorpusConfig, REPO_ROOT / "configs" / "corpus" / "builtin.yaml")
    manifest = prepare(corpus, data_dir)
    print(f"      {manifest.num_tokens:,} tokens in {sum(len(s.shards) for s in manifest.sources)} shards", flush=True)

    config_path = REPO_ROOT / "configs" / "train" / "tiny-demo.yaml"
    overrides = [f"data_dir={data_dir}", f"run_dir={run_dir}"]
    config = load_config(TrainConfig, config_path, overrides)
    print(f"[2/4] pretraining: tiny model on {nproc} gloo ranks → {run_dir}", flush=True)
    run_pretraining(config_path, overrides, nproc, run_dir)

    print("[3/4] milestones → Hugging Face models", flush=True)
    milestones = [ref for ref in list_checkpoints(run_dir) if ref.milestone]
    exported = []
    for ref in milestones:
        loaded = load_checkpoint(ref.path)
        out = export_hf(loaded.model, models_dir / f"base-step_{ref.step:08d}", tokenizer_dir=loaded.tokenizer_dir,
                        extra_metadata={"source_checkpoint": str(ref.path)})
        exported.append((ref, out))

    print("[4/4] samples", flush=True)
    samples = {}
    for ref, out in exported:
        for prompt in ("The ", "def "):
            key = f"base@{ref.step} {prompt!r}"
            samples[key] = sample_text(out, prompt)
            print(f"--- base model at step {ref.step} ---\n{samples[key]}\n", flush=True)

    latest = json.loads((run_dir / "latest.json").read_text())
    loader = TokenLoader(data_dir, config.window, 1, holdout_docs_per_source=config.eval.holdout_docs_per_source,
                         seed=config.seed)
    summary = {
        "seconds": round(time.time() - started, 1),
        "val_loss": latest.get("val_loss", {}).get("all"),
        "unigram_val_loss": round(unigram_cross_entropy(loader), 4),
        "milestones": len(milestones),
        "branches": 0,
        "samples": samples,
    }
    print(f"validation loss {summary['val_loss']:.3f} vs unigram baseline {summary['unigram_val_loss']:.3f}")
    print("tree:\n  trunk " + str(run_dir) + "".join(f"\n  ├── milestone step {ref.step} → {out}" for ref, out in exported))
    print(f"done in {summary['seconds']:.0f} s")
    return summary


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
