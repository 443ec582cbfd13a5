"""A run's curves as a PNG (matplotlib, no display needed): training and per-source validation loss, lr, grad
norm and tokens/s over steps. `genesis plot` writes it; the pretrain flow logs it to MLflow at each milestone."""

from __future__ import annotations

from pathlib import Path

from genesis.run_dir import RunDir
from serve.run_view import CurveReader


def plot_run(run_dir: Path, out: Path) -> Path | None:
    """Write the run's curves to `out` (atomically); None when the run has logged nothing yet."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = CurveReader(RunDir(Path(run_dir)).metrics).series()
    train, val = series["train"], series["val"]
    if not train.get("loss"):
        return None
    figure, (loss_axis, lr_axis, gnorm_axis, speed_axis) = plt.subplots(
        4, 1, figsize=(9, 10), sharex=True, height_ratios=[3, 1, 1, 1])
    loss_axis.plot(*zip(*train["loss"]), label="train", color="black", linewidth=1)
    for source, points in sorted(val.items()):
        loss_axis.plot(*zip(*points), marker="o", markersize=3, label=f"val {source}")
    loss_axis.set_ylabel("loss (nats/token)")
    loss_axis.legend(fontsize=8)
    loss_axis.set_title(f"{Path(run_dir).name}: step {series['last_step']}")
    for axis, key, label, color in ((lr_axis, "lr", "lr", "tab:blue"), (gnorm_axis, "grad_norm", "grad norm", "tab:red"),
                                    (speed_axis, "tokens_per_s", "tokens/s", "tab:green")):
        if train.get(key):
            axis.plot(*zip(*train[key]), color=color, linewidth=1)
        axis.set_ylabel(label)
    speed_axis.set_xlabel("step")
    for axis in (loss_axis, lr_axis, gnorm_axis, speed_axis):
        axis.grid(alpha=0.3)
    figure.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp.png")
    figure.savefig(tmp, dpi=110)
    plt.close(figure)
    tmp.replace(out)
    return out
