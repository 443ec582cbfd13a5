"""What one compiled genesis-1b block keeps for backward, per 2048-token sequence, at several compile memory
budgets (`parallel.compile_memory_budget`).

A block's parameters are cast to bf16 (as FSDP's bf16 parameter policy gathers them); the block is compiled
as the trainer compiles it; a saved-tensor hook records every tensor autograd keeps, and storages are
counted once (views share them), parameters excluded. On CPU the sequence is shortened and the figures are
scaled to 2048 tokens (every saved tensor here is linear in T).

    python bench/saved_activations.py --budgets 1.0 0.9 --out bench/results/saved_activations.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS_DIR, append_run, command_line, environment, git_rev  # noqa: E402
from genesis.config import load_model_config  # noqa: E402
from genesis_model.model import Block, rope_tables  # noqa: E402

FULL_SEQ = 2048


def saved_tensors(block: torch.nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> list[dict]:
    parameter_storages = {p.untyped_storage().data_ptr() for p in block.parameters()}
    seen: dict[int, dict] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameter_storages and storage.data_ptr() not in seen:
            seen[storage.data_ptr()] = {"shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch."),
                                        "bytes": storage.nbytes()}
        return tensor

    # NOTE: AOTAutograd partitions the joint forward/backward graph on the first forward, so the forward alone
    # shows what backward will read; running backward would only add minutes on a CPU.
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x, cos, sin)
    return sorted(seen.values(), key=lambda entry: -entry["bytes"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="genesis-1b")
    parser.add_argument("--budgets", nargs="+", type=float, default=[1.0, 0.9])
    parser.add_argument("--seq-len", type=int, default=None, help="default: 2048 on CUDA, 256 on CPU")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "saved_activations.json")
    args = parser.parse_args()

    import torch._functorch.config as functorch_config

    device = "cuda" if torch.cuda.is_available() else "cpu"
    seq_len = args.seq_len or (FULL_SEQ if device == "cuda" else 256)
    config = load_model_config(args.model)
    cos, sin = (table.to(device) for table in rope_tables(config.head_dim, seq_len, config.rope_theta))
    results = {**environment(), "command": command_line("saved_activations.py"), "git_rev": git_rev(),
               "device": device, "model": args.model, "seq_len": seq_len, "budgets": []}
    for budget in args.budgets:
        torch._dynamo.reset()
        functorch_config.activation_memory_budget = budget
        torch.manual_seed(0)
        block = Block(config).to(device=device, dtype=torch.bfloat16)
        block.compile(fullgraph=True)
        x = torch.randn(1, seq_len, config.dim, device=device, dtype=torch.bfloat16, requires_grad=True)
        tensors = saved_tensors(block, x, cos, sin)
        scale = FULL_SEQ / seq_len / 2**20
        for entry in tensors:
            entry["mib_per_seq"] = round(entry.pop("bytes") * scale, 2)
        total = round(sum(entry["mib_per_seq"] for entry in tensors), 1)
        results["budgets"].append({"budget": budget, "mib_per_seq_per_block": total,
                                   "gib_per_seq_all_blocks": round(total * config.n_layers / 1024, 3),
                                   "tensors": tensors})
        print(f"budget {budget}: {total} MiB per sequence per block; "
              + ", ".join(f"{e['shape']} {e['dtype']} {e['mib_per_seq']}" for e in tensors), flush=True)
    append_run(args.out, results, results, whole_top=True)  # the top level: the newest run


if __name__ == "__main__":
    main()
