"""Milestone branches: SFT then DPO off a pretraining milestone, shaped by written principles.

Plain Python, callable from the CLI (`genesis branch`) and from the orchestration flows:
  principles.py     configs/principles.yaml → system prompt
  dialogues.py      the built-in principle-shaped dialogues and their hedged rewrites
  rubric.py         the hedging / curiosity rubric and the pair builder
  conversations.py  SFT and DPO data from configured sources, checked and reported
  training.py       TRL SFTTrainer / DPOTrainer
  evaluate.py       held-out preference accuracy, chat-format adherence, hedging, samples
  pipeline.py       one branch end to end: export → SFT → DPO → eval.json
"""
