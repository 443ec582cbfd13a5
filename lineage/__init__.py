"""Lineage: every stage a run in MLflow, every milestone and branch a registered model version.

  tracking.py  the Tracker and runs: nested (mlflow.parentRunId), open for as long as their work, system metrics,
               params, datasets with local sources
  models.py    a Hugging Face directory logged as an MLflow model (transformers flavor, chat task and signature)
  stages.py    the SFT and DPO runs, opened by branch/pipeline.py's stage recorder while they train
  registry.py  connect(), the model registry (versions, descriptions, aliases, promote) and the lineage tree
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
