"""Thin Prefect tasks over the plain-Python stages: caching, retries, timeouts and logging, nothing else.

Cache keys come from the task's inputs and its source code (INPUTS + TASK_SOURCE), so a rerun after a failure
returns finished stages from the cache. A stage whose output has gone missing is refreshed instead (see
`refresh_if_missing`): the cache must never claim work that is no longer on disk.
"""

from __future__ import annotations

from pathlib import Path

from prefect.cache_policies import INPUTS, TASK_SOURCE

STAGE_CACHE = INPUTS + TASK_SOURCE


def refresh_if_missing(task, *outputs: Path):
    """The task, told to recompute (and re-cache) when any of its expected outputs is gone."""
    return task.with_options(refresh_cache=not all(Path(p).exists() for p in outputs))
