"""Which SDPA backend is fastest for genesis-1b's attention on this GPU (forward + backward, bf16)?

Shapes: 16 query heads, 4 key/value heads, head dim 128, T=2048, causal. Each backend is tried with native
grouped-query attention (`enable_gqa=True`) and with keys/values expanded to 16 heads.

    python bench/sdpa.py [--out bench/results/sdpa.json]

Each call appends its run to --out (command, machine, torch version, git revision); a machine without CUDA is
refused before anything is written.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import RESULTS_DIR, append_run, command_line, environment, git_rev, write_json  # noqa: E402

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def time_backend(backend, batch, gqa, repeats=20):
    q = torch.randn(batch, 16, 2048, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(batch, 4, 2048, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(batch, 4, 2048, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def run():
        with sdpa_kernel([BACKENDS[backend]]):
            if gqa:
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            else:
                out = F.scaled_dot_product_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1),
                                                     is_causal=True)
        out.sum().backward()

    for _ in range(3):
        run()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        run()
    end.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(end) / repeats
    flops = 4 * batch * 16 * 2048 * 2048 * 128 * 3.5 / 2  # fwd 2 matmuls + bwd 5, causal half
    return {"backend": backend, "batch": batch, "gqa_native": gqa, "ms": round(ms, 3),
            "tflops": round(flops / ms / 1e9, 1)}


def keep_first_shape_as_a_run(path: Path) -> None:
    """A file written before runs were kept held one run, its timings under "runs": rewritten as the first run
    (its timings under "timings", as later runs have them), so appending loses nothing and mixes no shapes."""
    existing = json.loads(path.read_text()) if path.is_file() else {}
    if existing.get("runs") and "backend" in existing["runs"][0]:
        earlier = {key: value for key, value in existing.items() if key != "runs"} | {"timings": existing["runs"]}
        write_json(path, {"runs": [earlier]})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "sdpa.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: bench/sdpa.py times CUDA attention kernels and this machine has no CUDA GPU: run it on one",
              file=sys.stderr)
        return 2
    rows = []
    for batch in (1, 8):
        for backend in BACKENDS:
            for gqa in (True, False):
                try:
                    rows.append(time_backend(backend, batch, gqa))
                except Exception as err:
                    rows.append({"backend": backend, "batch": batch, "gqa_native": gqa,
                                 "error": f"{type(err).__name__}: {str(err)[:200]}"})
                print(json.dumps(rows[-1]), flush=True)
    keep_first_shape_as_a_run(args.out)
    append_run(args.out, {**environment(), "command": command_line("sdpa.py", argv), "git_rev": git_rev(),
                          "timings": rows}, {})
    return 0


if __name__ == "__main__":
    sys.exit(main())
