"""What each rank's GPU is doing, as the reference post's tracker showed it: utilisation, memory in use,
temperature and power, read through NVIDIA's management library (`nvidia-ml-py`, the maintained binding that
nvidia-smi's own library is published as; MLflow's system metrics read the same).

Every rank reads its own GPU (found by UUID, so CUDA_VISIBLE_DEVICES in any form maps right); rank 0 gathers
the readings on logging steps and logs them as `gpu/<rank>/<figure>` metrics, so they reach metrics.jsonl,
latest.json, `genesis serve` and the MLflow run like any other figure. Without a GPU nothing is read and no key
appears; on a GPU without a usable NVML the run says once why, and goes on.
"""

from __future__ import annotations

import math

# The figures, in the order of a reading; each is one float (NaN: not available on this GPU).
FIGURES = ("utilization_pct", "memory_used_gib", "memory_total_gib", "temperature_c", "power_w")


def metric_key(rank: int, figure: str) -> str:
    return f"gpu/{rank}/{figure}"


class GpuReader:
    """NVML for one CUDA device. `unavailable` says why not when it cannot read (and `read` gives NaNs)."""

    def __init__(self, device):
        """`device`: a torch.device (torch is imported only here: serve reads the metrics without it)."""
        import torch

        self.handle = None
        self.unavailable: str | None = None
        if device.type != "cuda":
            self.unavailable = "not a GPU"
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            uuid = f"GPU-{torch.cuda.get_device_properties(device).uuid}"
            self.handle = pynvml.nvmlDeviceGetHandleByUUID(uuid)
            self._nvml = pynvml
        except ImportError:
            self.unavailable = "nvidia-ml-py is not installed (pip install nvidia-ml-py)"
        except Exception as err:  # noqa: BLE001 - NVML's errors are its own classes; the run goes on without it
            self.unavailable = f"NVML could not open the GPU: {type(err).__name__}: {err}"

    def read(self) -> list[float]:
        """One reading of FIGURES; a figure this GPU does not report (e.g. power on some boards) is NaN."""
        if self.handle is None:
            return [math.nan] * len(FIGURES)
        nvml, handle = self._nvml, self.handle

        def figure(read):
            try:
                return float(read())
            except Exception:  # noqa: BLE001 - NVMLError_NotSupported and kin: one figure missing, not all
                return math.nan

        memory = figure(lambda: nvml.nvmlDeviceGetMemoryInfo(handle).used / 2**30)
        total = figure(lambda: nvml.nvmlDeviceGetMemoryInfo(handle).total / 2**30)
        return [
            figure(lambda: nvml.nvmlDeviceGetUtilizationRates(handle).gpu),
            memory,
            total,
            figure(lambda: nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)),
            figure(lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0),  # milliwatts
        ]


def readings_to_metrics(readings: list[list[float]]) -> dict[str, float]:
    """Per-rank readings (rank order) → `gpu/<rank>/<figure>` metrics, leaving out what was not read."""
    metrics = {}
    for rank, reading in enumerate(readings):
        for name, value in zip(FIGURES, reading):
            if not math.isnan(value):
                metrics[metric_key(rank, name)] = round(value, 2)
    return metrics


def gpus_from_metrics(metrics: dict) -> list[dict]:
    """`gpu/<rank>/<figure>` keys (latest.json, a metrics row) → one dict per rank, in rank order."""
    ranks: dict[int, dict] = {}
    for key, value in metrics.items():
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == "gpu" and parts[1].isdigit() and parts[2] in FIGURES:
            ranks.setdefault(int(parts[1]), {"rank": int(parts[1])})[parts[2]] = value
    return [ranks[rank] for rank in sorted(ranks)]
