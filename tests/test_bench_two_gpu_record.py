"""bench/two_gpu.py's scaling record: the top-level figures stay the default variant's at the headline setup, and
the reference run's micro-batch 1 × accumulation 64 (#27 item 3) is read from its newest row, whichever variant."""

from __future__ import annotations

from bench.two_gpu import scaling_figures


def row(micro_batch: int, accum: int, variant: str, measured: str, p2p: float, no_p2p: float) -> dict:
    return {"micro_batch": micro_batch, "accum": accum, "variant": variant, "measured": measured, "steps": 8,
            "median_after_step": 2, "tok_s_1gpu": 60_000.0, "tok_s_2gpu": 60_000.0 * p2p,
            "tok_s_2gpu_no_p2p": 60_000.0 * no_p2p, "scaling_p2p": p2p, "scaling_no_p2p": no_p2p,
            "mfu_per_gpu_1gpu": 0.5, "mfu_per_gpu_2gpu": 0.5, "mfu_per_gpu_2gpu_no_p2p": 0.5}


def test_the_micro_batch_1_figures_come_from_the_newest_row_of_that_setup_and_name_its_variant():
    headline = row(4, 16, "default", "2026-11-30T20:10:00+0000", 1.99, 1.97)
    old = row(1, 64, "default", "2026-11-30T20:30:00+0000", 1.47, 1.46)
    replica = row(1, 64, "parallel.micro_steps=replica", "2026-12-05T10:00:00+0000", 1.9, 1.8)
    rows = {(r["micro_batch"], r["accum"], r["variant"]): r for r in (headline, old, replica)}

    record = scaling_figures(rows, first_now=replica)

    assert (record["scaling_p2p"], record["scaling_no_p2p"]) == (1.99, 1.97)  # a variant never takes the top level
    assert (record["scaling_mb1_p2p"], record["scaling_mb1_no_p2p"]) == (1.9, 1.8)
    assert record["scaling_mb1_variant"] == "parallel.micro_steps=replica"
    assert len(record["scaling_setups"]) == 3

    without = scaling_figures({key: r for key, r in rows.items() if key[:2] != (1, 64)}, first_now=headline)
    assert "scaling_mb1_p2p" not in without  # not measured: not reported
