"""GPU time per step by kind of kernel, from a profiler's Chrome trace (bench/profile_step.py --trace).

    python bench/kernel_categories.py TRACE.json[.gz] --steps 2 [--label fp8] [--out bench/results/fp8_profile.json]

Kinds, by kernel name (cuBLAS's Hopper kernels are named `nvjet_sm90_<types>...`: `tst` bf16, `qqtst` FP8 × FP8,
`qrtst` FP8 e4m3 × e5m2, the gradient matmuls):
  fp8_matmul        cuBLAS FP8 matmuls (torch._scaled_mm)
  bf16_matmul       the other cuBLAS matmuls
  attention         cuDNN's fused attention and its helper kernels
  fp8_scale_cast    Inductor's kernels that take an amax or scale and cast to FP8 (abs, max, clamp, reciprocal in
                    their fused names), whatever else they fuse
  other_triton      Inductor's other kernels (norms, SwiGLU, rotary, residual adds, the loss)
  optimizer         the fused AdamW
  other             everything else (copies, small eager kernels)
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import append_run, environment  # noqa: E402
from genesis_model.profiling import device_events  # noqa: E402

_CAST_MARKERS = ("abs", "reciprocal", "clamp")


def kernel_kind(name: str) -> str:
    if name.startswith("nvjet_sm90_q"):
        return "fp8_matmul"
    if name.startswith("nvjet") or "gemm" in name.lower() or "cutlass" in name:
        return "bf16_matmul"
    if "sdpa" in name or "flash" in name or name.startswith("void cudnn::fusion"):
        return "attention"
    if name.startswith("triton"):
        return "fp8_scale_cast" if any(marker in name for marker in _CAST_MARKERS) else "other_triton"
    if "multi_tensor_apply" in name:
        return "optimizer"
    return "other"


def categorize(trace: dict, steps: int) -> dict:
    """Milliseconds and kernel launches per step of each kind, and the ten largest kernels of each."""
    milliseconds: dict[str, float] = defaultdict(float)
    launches: dict[str, int] = defaultdict(int)
    by_name: dict[str, float] = defaultdict(float)
    for event in device_events(trace):
        kind = kernel_kind(event["name"])
        milliseconds[kind] += float(event["dur"]) / 1000
        launches[kind] += 1
        by_name[event["name"]] += float(event["dur"]) / 1000
    largest = sorted(by_name.items(), key=lambda item: -item[1])[:10]
    return {
        "kernel_ms_per_step": round(sum(milliseconds.values()) / steps, 2),
        "kinds": {kind: {"ms_per_step": round(ms / steps, 2), "launches_per_step": launches[kind] / steps}
                  for kind, ms in sorted(milliseconds.items(), key=lambda item: -item[1])},
        "largest_kernels": [{"name": name[:160], "ms_per_step": round(ms / steps, 3),
                             "kind": kernel_kind(name)} for name, ms in largest],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trace", type=Path)
    parser.add_argument("--steps", type=int, required=True, help="the profiled steps the trace holds")
    parser.add_argument("--label", default=None)
    parser.add_argument("--out", type=Path, default=None, help="append the summary as a run here")
    args = parser.parse_args()
    opener = gzip.open if args.trace.suffix == ".gz" else open
    with opener(args.trace, "rt") as handle:
        summary = categorize(json.load(handle), args.steps)
    print(json.dumps(summary, indent=1))
    if args.out:
        run = {**environment(), "command": "python " + " ".join(sys.argv), "label": args.label,
               "trace": str(args.trace), **summary}
        append_run(args.out, run, {})


if __name__ == "__main__":
    main()
