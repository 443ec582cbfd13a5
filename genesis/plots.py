"""Loss curves as a PNG (matplotlib, no display needed): training loss, per-source validation loss, lr."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(run_dir: Path) -> list[dict]:
    rows = []
    path = Path(run_dir) / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line being written right now
    return rows


def plot_run(run_dir: Path, out: Path) -> Path | None:
    """Write the run's curves to `out`; None when the run has logged nothing yet."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    if not rows:
        return None
    figure, (loss_axis, lr_axis) = plt.subplots(2, 1, figsize=(9, 7), sharex=True, height_ratios=[3, 1])
    train = [(r["step"], r["loss"]) for r in rows if isinstance(r.get("loss"), (int, float))]
    loss_axis.plot(*zip(*train), label="train", color="black", linewidth=1)
    sources = sorted({k for r in rows for k in r if k.startswith("val_loss/")})
    for key in sources:
        points = [(r["step"], r[key]) for r in rows if key in r]
        loss_axis.plot(*zip(*points), marker="o", markersize=3, label=key.replace("val_loss/", "val "))
    loss_axis.set_ylabel("loss (nats/token)")
    loss_axis.legend(fontsize=8)
    loss_axis.grid(alpha=0.3)
    loss_axis.set_title(f"{Path(run_dir).name}: step {rows[-1]['step']}")
    lr = [(r["step"], r["lr"]) for r in rows if "lr" in r]
    if lr:
        lr_axis.plot(*zip(*lr), color="tab:blue")
    lr_axis.set_ylabel("lr")
    lr_axis.set_xlabel("step")
    lr_axis.grid(alpha=0.3)
    figure.tight_layout()
    out = Path(out)
    tmp = out.with_name(out.stem + ".tmp.png")
    figure.savefig(tmp, dpi=110)
    plt.close(figure)
    tmp.replace(out)
    return out
