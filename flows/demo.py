"""`genesis demo`: the main job on a fresh CPU machine, in minutes, with nothing downloaded.

Runs genesis_flow under an embedded Prefect server with MLflow on SQLite:
built-in corpus → tokenizer → token shards → tiny model pretrained on 2 gloo ranks under torchrun, reaching
2 milestones → an SFT + DPO branch at each, grown while the trunk keeps training → everything registered →
the lineage tree, a sample reply from each model, and how to open the Prefect and MLflow UIs.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path


SAMPLE_PROMPT = "Why do we have seasons?"
DEMO_BRANCH_OVERRIDES = ["sft.epochs=2", "eval.max_prompts=16", "eval.max_new_tokens=100"]


def sample_reply(model_dir: Path, prompt: str, chat: bool, max_new_tokens: int = 60) -> str:
    from genesis.chat import EOS, IM_END, IM_START, encode_chat
    from genesis_model.generate import Generator, SamplingConfig
    from genesis_model.inference import load_hf, load_tokenizer

    loaded = load_hf(model_dir)
    tokenizer = load_tokenizer(loaded.tokenizer_dir, str(model_dir))
    if chat:
        ids = encode_chat(tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True)
    else:
        ids = tokenizer.encode(prompt, add_special_tokens=False)
    stop = {tokenizer.convert_tokens_to_ids(t) for t in (IM_END, EOS, IM_START)}
    new = Generator(loaded.model).generate(ids, SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.7, top_k=40,
                                                               seed=0), stop_ids=stop)
    return tokenizer.decode([t for t in new if t not in stop], skip_special_tokens=True).strip()


def unigram_baseline(run_dir: Path) -> float:
    """The unigram cross-entropy on the run's own held-out documents (what the model must clearly beat)."""
    from genesis.config import TrainConfig, load_config
    from genesis.run_dir import RunDir
    from genesis_model.loader import TokenLoader, unigram_cross_entropy

    config = load_config(TrainConfig, RunDir(run_dir).config)
    loader = TokenLoader(config.data_dir, config.window, 1, holdout_docs_per_source=config.eval.holdout_docs_per_source,
                         seed=config.seed)
    return unigram_cross_entropy(loader)


def demo(workdir: Path, nproc: int = 2) -> dict:
    workdir = workdir.resolve()
    os.environ.setdefault("GENESIS_HOME", str(workdir / "mlflow"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no telemetry from the embedded server
    from flows.tree import genesis_flow
    from lineage.registry import BASE, DPO, SFT, connect, default_tracking_uri, lineage, resolve_model_uri

    started = time.time()
    result = genesis_flow(corpus="configs/corpus/builtin.yaml", data_dir=str(workdir / "data"),
                          train_config="configs/train/tiny-demo.yaml", run_dir=str(workdir / "trunk"), nproc=nproc,
                          branch_config="configs/branch/tiny.yaml", branch_overrides=DEMO_BRANCH_OVERRIDES)
    tracker = connect()
    tree = lineage(tracker)

    print("\n" + "=" * 100 + "\nlineage (from MLflow):\n" + result["lineage"], flush=True)
    samples = {}
    for node in tree:
        for name, version, chat in [(BASE, node["version"], False)] + [
                (kind_name, branch[kind]["version"], True)
                for branch in node["branches"] for kind, kind_name in (("sft", SFT), ("dpo", DPO)) if branch[kind]]:
            uri = f"models:/{name}/{version}"
            prompt = "The sky is blue because" if not chat else SAMPLE_PROMPT
            samples[f"{uri} (step {node['step']})"] = reply = sample_reply(resolve_model_uri(uri), prompt, chat)
            print(f"\n--- {uri}, milestone step {node['step']} ---\n> {prompt}\n{reply}", flush=True)

    trunk = result["trunk"]
    summary = {
        "seconds": round(time.time() - started, 1),
        "val_loss": trunk["val_loss"].get("all"),
        "unigram_val_loss": round(unigram_baseline(Path(trunk["run_dir"])), 4),
        "milestones": len(trunk["milestones"]),
        "branches": sum(len(node["branches"]) for node in tree),
        "samples": samples,
        "branch_eval": [b["eval"] for b in result["branches"]],
    }
    print(f"\nvalidation loss {summary['val_loss']:.3f} vs unigram baseline {summary['unigram_val_loss']:.3f} nats/token")
    print(f"done in {summary['seconds']:.0f} s\n")
    print("Look around:")
    print(f"  MLflow UI:   mlflow ui --backend-store-uri {default_tracking_uri()}   (then http://127.0.0.1:5000)")
    print("  Prefect UI:  prefect server start   (then http://127.0.0.1:4200; the demo ran on a temporary server,")
    print("               `prefect deploy --all` and a process worker give you the flows as deployments)")
    print(f"  Try a model: genesis generate --model models:/{DPO}@latest --chat --prompt '{SAMPLE_PROMPT}'"
          f"   (with GENESIS_HOME={os.environ['GENESIS_HOME']})")
    return summary


def write_summary(summary: dict, path: Path) -> None:
    path.write_text(json.dumps(summary, indent=2))

