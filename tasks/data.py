"""Data-stage tasks: clean + dedup (reads the sources: network for hub datasets), tokenizer, shards.

Each takes the data directory as the step before left it and returns it with its own output added, so the
three run in order and each is refreshed when its output is gone (data_prep.finished).

Inside the stage tasks, every job of the stage (a read unit, a dedup bucket or verification chunk, a part to
tokenize) is a Prefect task run of its own, submitted to prefect-dask's DaskTaskRunner: a Dask LocalCluster of
the corpus's `workers`, or the cluster at its `dask_address`. The jobs show in the flow run's graph and their
progress (documents, MB/s, ETA) in the task logs. A corpus with `executor: serial` runs its jobs in the task's
own process, one after another (tests, one-core boxes).
"""

from __future__ import annotations

import inspect
import logging
import re
from contextlib import contextmanager
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed

from data_prep import finished, stage_clean, stage_shards, stage_tokenizer
from data_prep.executor import Progress, SerialExecutor, local_cluster_options, worker_spawn_environment
from data_prep.sources import CorpusConfig
from tasks import stage_task


class PrefectDaskJobs:
    """A data-stage executor whose jobs are Prefect task runs on prefect-dask's DaskTaskRunner."""

    def __init__(self, corpus: CorpusConfig):
        from prefect_dask import DaskTaskRunner

        # Dask's own chatter (scheduler and nanny start-up and shutdown, "worker still alive after 4 s, killing")
        # stays out of the flow's log (local_cluster_options); a job's error reaches the task as its exception.
        cluster = local_cluster_options(corpus.workers)
        logging.getLogger("distributed").setLevel(logging.ERROR)  # silence_logs covers only the cluster's start
        logging.getLogger("prefect.task_runner.dask").setLevel(logging.WARNING)  # "dashboard at :8787" (there is none)
        self.runner = DaskTaskRunner(address=corpus.dask_address) if corpus.dask_address else \
            DaskTaskRunner(cluster_kwargs=cluster)
        with worker_spawn_environment():
            self.runner.__enter__()
        self.workers = corpus.workers
        self.log = get_run_logger().info

    def map(self, function, jobs, label, sizes=None):
        name = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")
        job_task = task(function, name=name, cache_policy=NO_CACHE, persist_result=False)
        names = list(inspect.signature(function).parameters)
        futures = [self.runner.submit(job_task.with_options(task_run_name=f"{name}-{number}"),
                                      parameters=dict(zip(names, job)))
                   for number, job in enumerate(jobs)]
        progress = Progress(label, len(jobs), sum(sizes) if sizes else None, self.log)
        for future in as_completed(futures):
            progress.update(future.result())
        return [future.result() for future in futures]

    def close(self) -> None:
        self.runner.__exit__(None, None, None)


@contextmanager
def _jobs(corpus: CorpusConfig):
    jobs = SerialExecutor(get_run_logger().info) if corpus.executor == "serial" else PrefectDaskJobs(corpus)
    try:
        yield jobs
    finally:
        jobs.close()


@stage_task(done=lambda corpus, data_dir: finished(corpus, data_dir, "clean"), name="download-clean-dedup",
            retries=3, retry_delay_seconds=[10, 60, 300], timeout_seconds=6 * 3600)
def clean_dedup_task(corpus: CorpusConfig, data_dir: str) -> str:
    """The data directory with the sources' clean, deduplicated text and its report."""
    # NOTE: retries with backoff because hub sources stream over the network; finished read units, dedup jobs
    # and shards are skipped by the stage itself, so a retry redoes only what did not finish.
    with _jobs(corpus) as jobs:
        report = stage_clean(corpus, Path(data_dir), executor=jobs, log=get_run_logger().info)
    for name, row in report.items():
        if not name.startswith("_"):
            get_run_logger().info(f"{name}: {row.get('docs_out', 0):,} docs kept "
                                  f"({row.get('exact_duplicates_removed', 0)} exact, {row.get('near_duplicates_removed', 0)} near duplicates removed)")
    get_run_logger().info(f"seconds per phase: {report.get('_timings', {})}")
    return data_dir


@stage_task(done=lambda corpus, data_dir: finished(corpus, data_dir, "tokenizer"), name="train-tokenizer",
            timeout_seconds=3 * 3600)
def tokenizer_task(corpus: CorpusConfig, data_dir: str) -> str:
    """The data directory with a tokenizer trained on its clean text."""
    get_run_logger().info(f"tokenizer: {stage_tokenizer(corpus, Path(data_dir))}")
    return data_dir


@stage_task(done=lambda corpus, data_dir: finished(corpus, data_dir, "shards"), name="tokenize-shards",
            timeout_seconds=12 * 3600)
def shards_task(corpus: CorpusConfig, data_dir: str) -> dict:
    """The data directory with token shards and manifest.json, and how many tokens they hold."""
    with _jobs(corpus) as jobs:
        manifest = stage_shards(corpus, Path(data_dir), executor=jobs, log=get_run_logger().info)
    get_run_logger().info(f"{manifest.num_tokens:,} tokens in {sum(len(s.shards) for s in manifest.sources)} shards")
    return {"data_dir": data_dir, "tokens": manifest.num_tokens}
