"""Load a model for inference from a trainer checkpoint or a Hugging Face directory, with its tokenizer."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from genesis.config import ModelConfig
from genesis.errors import CheckpointError, GenesisError
from genesis.run_dir import read_meta
from genesis_model.checkpoint import load_model_weights
from genesis_model.model import Transformer


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer_dir: Path | None
    source: str


def tokenizer_dir_of_checkpoint(meta: dict) -> Path | None:
    """The tokenizer that made the checkpoint's training data: <data_dir>/<manifest tokenizer path>'s folder."""
    data_dir = Path(meta.get("config", {}).get("data_dir", ""))
    manifest = data_dir / "manifest.json"
    if not manifest.is_file():
        return None
    tokenizer_path = data_dir / json.loads(manifest.read_text())["tokenizer"]["path"]
    return tokenizer_path.parent if tokenizer_path.parent.is_dir() else None


def load_checkpoint(path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu",
                    verify: bool = True) -> LoadedModel:
    """A complete checkpoint's weights, checked against its marker's digests first unless `verify` is False (the
    caller then tells the user the weights were not checked)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint does not exist; pass a run's checkpoints/step_N or milestones/step_N")
    meta = read_meta(path)
    config = ModelConfig.model_validate(meta["model_config"])
    model = Transformer(config)
    try:
        load_model_weights(path, model, verify=verify)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: weights do not match the model config ({str(err).splitlines()[0]})") from None
    return LoadedModel(model.to(device, dtype).eval(), tokenizer_dir_of_checkpoint(meta), str(path))


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.float32,
                      tokenizer_dir: str | Path | None = None) -> Path:
    """Check every file of a complete checkpoint against its marker's digests, then write its weights as a Hugging
    Face directory (with the run's tokenizer unless another is given). The directory appears whole or not at all,
    its `genesis.json` naming the checkpoint and step it came from."""
    from genesis_model.hf import export_hf

    checkpoint = Path(checkpoint)
    meta = read_meta(checkpoint)  # one line for a missing or incomplete checkpoint
    loaded = load_checkpoint(checkpoint)  # verified before it is read
    return export_hf(loaded.model, out_dir, tokenizer_dir=tokenizer_dir or loaded.tokenizer_dir, dtype=dtype,
                     extra_metadata={"source_checkpoint": str(checkpoint.resolve()), "step": meta.get("step")})


def load_hf(path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> LoadedModel:
    from genesis_model.hf import import_hf

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory; pass a Hugging Face model directory")
    model = import_hf(path, dtype=dtype)
    has_tokenizer = (path / "tokenizer.json").is_file()
    return LoadedModel(model.to(device).eval(), path if has_tokenizer else None, str(path))


def load_tokenizer(tokenizer_dir: Path | None, source: str):
    if tokenizer_dir is None or not (Path(tokenizer_dir) / "tokenizer.json").is_file():
        raise GenesisError(f"{source}: no tokenizer found beside the model; export with the data's tokenizer "
                           f"(genesis export-hf --tokenizer DIR) or keep the run's data_dir in place")
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(tokenizer_dir))
