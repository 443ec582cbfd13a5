"""The data stage: corpus config → clean, deduplicated text → tokenizer → token shards and manifest.json.

    prepare(config, data_dir) -> Manifest      all of it; each step is skipped when done for this config
    stage_clean, stage_tokenizer, stage_shards  the same steps one at a time (the data flow's tasks)
    finished(config, data_dir, step)            whether a step's output is on disk for this config

The names are imported when first used, so `genesis --help` does not pay for the data stage's imports.
"""

from __future__ import annotations

from pathlib import Path

STEPS = ("clean", "tokenizer", "shards")
_PIPELINE = ("prepare", "stage_clean", "stage_tokenizer", "stage_shards")


def finished(config, data_dir: str | Path, step: str) -> bool:
    """`clean` and `tokenizer`: their stage marker holds this config's key; `shards`: manifest.json exists."""
    from data_prep.pipeline import StageMarkers, _keys
    from genesis.manifest import MANIFEST_NAME

    data_dir = Path(data_dir)
    if step not in STEPS:
        raise ValueError(f"unknown data step {step!r}; one of {', '.join(STEPS)}")
    if step == "shards":
        return (data_dir / MANIFEST_NAME).is_file()
    clean_key, tokenizer_key = _keys(config)
    return data_dir.is_dir() and StageMarkers(data_dir).done(step, clean_key if step == "clean" else tokenizer_key)


def __getattr__(name: str):
    if name in _PIPELINE:
        from data_prep import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'data_prep' has no attribute {name!r}")


__all__ = ["finished", *_PIPELINE]
