"""The data stage: corpus config → clean, deduplicated text → tokenizer → token shards and manifest.json.

    prepare(config, data_dir) -> Manifest      all of it; each step is skipped when done for this config
    stage_clean, stage_tokenizer, stage_shards  the same steps one at a time (the data flow's tasks)
    finished(config, data_dir, step)            whether a step's output is on disk for this config

The names are imported when first used, so `genesis --help` does not pay for the data stage's imports.
"""

from __future__ import annotations

_PIPELINE = ("prepare", "stage_clean", "stage_tokenizer", "stage_shards", "finished")


def __getattr__(name: str):
    if name in _PIPELINE:
        from data_prep import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'data_prep' has no attribute {name!r}")


__all__ = list(_PIPELINE)
