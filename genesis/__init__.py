"""Genesis: train small LLMs from scratch and grow them as a tree.

This package is the ground floor: the contracts every stage shares, importing nothing else of the project.
  config.py      the typed configuration system (pydantic models from YAML under configs/, with overrides)
  errors.py      the few error types, each a one-line message naming the file or field and the fix
  manifest.py    the token-shard contract between the data stage and the trainer
  run_dir.py     the run and branch directories: layout, the one lock, the one metrics reader, checkpoint listing
  chat.py        the chat format (ChatML with tool calls) and its special tokens
  records.py     local record files (globs, builders, numbered JSONL)
  principles/    the written principles and the built-in dialogues, read by the data stage and the branches
The stages stand on it: `genesis_model/` (engine), `data_prep/`, `branch/`, `lineage/`, `serve/`; above them
`tasks/`, `flows/` and the `genesis` command (`cli/`).
"""

__version__ = "0.1.0"
