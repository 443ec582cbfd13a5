"""Milestone branches: SFT then DPO off a pretraining milestone, shaped by written principles.

Plain Python, callable from the CLI (`genesis branch`) and from the orchestration flows:
  base.py           the milestone exported once: the base every branch off it starts from (and the registered one)
  data.py           SFT and DPO data from the recipe's sources, checked, split and reported
  conversations.py  reading conversations and preference records
  rubric.py         the hedging / curiosity rubric and the pair builder
  training.py       TRL SFTTrainer / DPOTrainer
  evaluate.py       held-out preference accuracy, chat-format adherence, hedging, samples
  pipeline.py       the stages, and one branch end to end: grow(milestone, config, out, log=print) → eval.json

`grow` is imported when first used, so `genesis --help` does not pay for the branch's imports.
"""


def __getattr__(name: str):
    if name == "grow":
        from branch.pipeline import grow

        return grow
    raise AttributeError(f"module 'branch' has no attribute {name!r}")


__all__ = ["grow"]
