"""Genesis: train small LLMs from scratch and grow them as a tree.

This package holds what every stage shares: the typed configuration system, the error types, the token-shard
manifest contract and the `genesis` command line. The stages themselves live in `genesis_model/` (model and
training engine), `data_prep/` (corpus to token shards), `tasks/` and `flows/` (orchestration).
"""

__version__ = "0.1.0"
