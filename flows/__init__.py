"""Prefect flows that read like the pipeline: data → trunk → a branch per milestone."""
