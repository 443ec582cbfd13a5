"""Thin Prefect tasks over the plain-Python stages: caching, retries, timeouts and logging, nothing else.

Each task takes the paths it reads and returns the paths it wrote (configs travel as data), so every argument
is used, and a flow that passes one task's result to the next draws the pipeline's edges in the run graph.

A stage task (`stage_task`) is cached on its inputs and source code (INPUTS + TASK_SOURCE), so a rerun after a
failure returns finished stages from the cache, but only while the stage's output is still on disk: each stage
task says how to tell (`done`), and a task whose output has gone runs again and re-caches. The cache must never
claim work that is no longer there, and no flow has to know where a stage writes to check.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from prefect import Task
from prefect.cache_policies import INPUTS, TASK_SOURCE

STAGE_CACHE = INPUTS + TASK_SOURCE


class StageTask(Task):
    """A cached task whose cache is refreshed when `done(**arguments)` says its output is gone."""

    def __init__(self, fn: Callable, done: Callable[..., bool], **options):
        super().__init__(fn=fn, cache_policy=STAGE_CACHE, persist_result=True, **options)
        self.done = done

    def __call__(self, *args, return_state: bool = False, wait_for=None, **kwargs):
        arguments = inspect.signature(self.fn).bind(*args, **kwargs).arguments
        task = self if self.done(**arguments) else self.with_options(refresh_cache=True)
        return Task.__call__(task, *args, return_state=return_state, wait_for=wait_for, **kwargs)


def stage_task(done: Callable[..., bool], **options) -> Callable[[Callable], StageTask]:
    """@stage_task(done=lambda <the task's arguments>: <its output is on disk>, name=..., retries=...)"""
    return lambda fn: StageTask(fn, done, **options)
