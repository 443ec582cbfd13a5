"""Lineage: every stage a run in MLflow, every milestone and branch a registered model version.

  registry.py  the tracking store, runs, the model registry and the lineage tree read back from it
  record.py    what each stage records: record_data, record_milestone, record_branch
  trunk.py     follow_trunk: the trainer launched and followed, metrics forwarded, milestones registered

Plain Python (no Prefect). `follow_trunk` is imported when first used: the registry alone needs no trainer.
"""


def __getattr__(name: str):
    if name == "follow_trunk":
        from lineage.trunk import follow_trunk

        return follow_trunk
    raise AttributeError(f"module 'lineage' has no attribute {name!r}")


__all__ = ["follow_trunk"]
