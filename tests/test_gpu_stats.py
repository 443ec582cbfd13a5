"""Each rank's GPU in the tracker (#27 item 4): utilisation, memory in use, temperature and power, through NVML,
as `gpu/<rank>/<figure>` metrics in metrics.jsonl, latest.json, `genesis serve` and MLflow; absent without a GPU.

NVML cannot run on this CPU machine: the readings here come from a stand-in reader; the gather to rank 0, the
naming, and what serve shows from them are the real code, on 2 gloo ranks."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from genesis_model.gpu_stats import FIGURES, GpuReader, gpus_from_metrics, readings_to_metrics


def test_without_a_gpu_nothing_is_read_and_no_gpu_figure_appears():
    reader = GpuReader(torch.device("cpu"))
    assert reader.unavailable == "not a GPU" and reader.handle is None
    assert all(math.isnan(value) for value in reader.read())
    assert readings_to_metrics([reader.read()]) == {}


def test_the_callbacks_of_a_cpu_run_read_no_gpu(tmp_path):
    from genesis.config import TrainConfig, load_config
    from genesis_model.callbacks import GpuStats, standard_callbacks
    from genesis_model.distributed import DistInfo

    config = load_config(TrainConfig, Path(__file__).parent.parent / "configs/train/tiny-cpu.yaml", [f"run_dir={tmp_path / 'run'}"])
    info = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), mesh=None)
    assert not any(isinstance(callback, GpuStats) for callback in standard_callbacks(config, info, 1000))


def test_readings_become_per_rank_metrics_and_back_leaving_out_what_a_gpu_does_not_report():
    readings = [[97.0, 61.234, 139.8, 71.0, 512.46], [88.0, 60.0, 139.8, 69.0, math.nan]]
    metrics = readings_to_metrics(readings)
    assert metrics["gpu/0/utilization_pct"] == 97.0 and metrics["gpu/0/memory_used_gib"] == 61.23
    assert metrics["gpu/0/power_w"] == 512.46 and "gpu/1/power_w" not in metrics  # power not reported there
    assert len(metrics) == 2 * len(FIGURES) - 1
    row = {"step": 10, "loss": 3.2, **metrics}
    assert gpus_from_metrics(row) == [
        {"rank": 0, "utilization_pct": 97.0, "memory_used_gib": 61.23, "memory_total_gib": 139.8,
         "temperature_c": 71.0, "power_w": 512.46},
        {"rank": 1, "utilization_pct": 88.0, "memory_used_gib": 60.0, "memory_total_gib": 139.8, "temperature_c": 69.0},
    ]
    assert gpus_from_metrics({"gpu/x/power_w": 1.0, "gpu/0/fan": 3.0, "loss": 1.0}) == []


class StandInReader:
    """A GPU's reading that depends on the rank, so the gathered order can be checked."""

    def __init__(self, rank: int):
        self.unavailable, self.rank = None, rank

    def read(self) -> list[float]:
        return [50.0 + self.rank, 10.0 + self.rank, 80.0, 60.0 + self.rank, 300.0 + self.rank]


def _gather_on_rank(rank: int, world_size: int, store_path: str, out_path: str) -> None:
    from genesis_model.callbacks import GpuStats
    from genesis_model.distributed import DistInfo

    store = dist.FileStore(store_path, world_size)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
    try:
        info = DistInfo(rank=rank, local_rank=rank, world_size=world_size, device=torch.device("cpu"), mesh=None)
        stats = GpuStats(info, host_group=dist.group.WORLD)
        stats.reader = StandInReader(rank)
        seen = []
        for step in (1, 2, 3, 4):
            trainer = SimpleNamespace(log_due=lambda step=step: step % 2 == 0, event=lambda *a, **k: None)
            metrics = {"step": step}
            stats.on_step_metrics(trainer, metrics)
            seen.append(metrics)
        with open(f"{out_path}.{rank}", "w") as handle:
            json.dump(seen, handle)
    finally:
        dist.destroy_process_group()


def test_rank_0_logs_every_ranks_gpu_on_logging_steps_only(tmp_path):
    out = str(tmp_path / "seen")
    mp.start_processes(_gather_on_rank, args=(2, str(tmp_path / "store"), out), nprocs=2, start_method="spawn")
    rank0 = json.loads(open(f"{out}.0").read())
    rank1 = json.loads(open(f"{out}.1").read())
    assert [sorted(m) for m in (rank0[0], rank0[2])] == [["step"], ["step"]]  # steps 1 and 3: not logged
    assert gpus_from_metrics(rank0[1]) == [
        {"rank": 0, "utilization_pct": 50.0, "memory_used_gib": 10.0, "memory_total_gib": 80.0,
         "temperature_c": 60.0, "power_w": 300.0},
        {"rank": 1, "utilization_pct": 51.0, "memory_used_gib": 11.0, "memory_total_gib": 80.0,
         "temperature_c": 61.0, "power_w": 301.0},
    ]
    assert rank0[3]["gpu/1/temperature_c"] == 61.0
    assert all(list(m) == ["step"] for m in rank1)  # only rank 0 logs


@pytest.mark.parametrize("where", ["latest", "metrics"])
def test_serve_shows_each_ranks_gpu_from_latest_json_or_the_last_logged_step(tmp_path, where):
    from serve.run_view import RunView

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    gpu = readings_to_metrics([[97.0, 61.0, 139.8, 71.0, 512.0], [95.0, 60.0, 139.8, 70.0, 505.0]])
    row = {"step": 20, "loss": 3.0, "time": 1.0}
    latest = {"status": "training", "step": 20, "target_step": 100, "updated": 1.0}
    (run_dir / "latest.json").write_text(json.dumps(latest | (gpu if where == "latest" else {})))
    (run_dir / "metrics.jsonl").write_text(json.dumps(row | (gpu if where == "metrics" else {})) + "\n")
    status = RunView(run_dir).status()
    assert [g["rank"] for g in status["gpus"]] == [0, 1]
    assert status["gpus"][1]["power_w"] == 505.0
    (run_dir / "latest.json").write_text(json.dumps(latest))
    (run_dir / "metrics.jsonl").write_text(json.dumps(row) + "\n")
    assert RunView(run_dir).status()["gpus"] == []  # a CPU run: no GPU table


def test_the_mlflow_follower_forwards_gpu_figures_under_their_names(tmp_path):
    from lineage.tracking import flatten, metric_name

    gpu = readings_to_metrics([[97.0, 61.0, 139.8, 71.0, 512.0]])
    names = {metric_name(key) for key in flatten({"step": 1, **gpu})} - {"step"}
    assert names == {f"gpu/0/{figure}" for figure in FIGURES}


if os.environ.get("GENESIS_GPU_TESTS"):  # on a GPU box: the real NVML
    def test_nvml_reads_this_gpu():
        reader = GpuReader(torch.device("cuda", 0))
        assert reader.unavailable is None, reader.unavailable
        utilization, used, total, temperature, _power = reader.read()
        assert 0 <= utilization <= 100 and 0 < used <= total and 0 < temperature < 120
