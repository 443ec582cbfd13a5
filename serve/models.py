"""Loaded models for the try-it page: a small LRU, one generation at a time per model, a bounded queue.

Every request for a model first takes a place in that model's line (`ModelLine`): the one generating plus at
most `queue_size` waiting. A request that finds the line full is refused at once (HTTP 429) rather than left
to wait without bound. The generation itself runs in a thread of its own, so a slow model never holds up the
server's event loop, and it checks a cancel flag between tokens: a client that goes away stops its generation.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from pydantic import BaseModel, Field

from genesis.errors import GenesisError
from serve.run_view import ModelEntry


class ServeLimits(BaseModel):
    """Bounds that keep one box answering under load. Defaults suit a CPU laptop and a tiny model."""

    max_prompt_chars: int = Field(default=4000, ge=1, description="longest prompt accepted, in characters")
    max_new_tokens: int = Field(default=512, ge=1, description="most tokens one request may ask for")
    queue_size: int = Field(default=8, ge=0, description="requests waiting per model besides the one generating")
    max_loaded_models: int = Field(default=2, ge=1, description="models kept in memory (least recently used leaves)")


class Busy(GenesisError):
    """The model's line is full, or every loaded model is busy: try again shortly (HTTP 429)."""


class ModelLoadFailed(GenesisError):
    """The model could not be loaded; the page shows the reason and keeps working."""


class ModelLine:
    """At most 1 + `queue_size` requests hold a place; the generation lock lets one of them run at a time."""

    def __init__(self, queue_size: int):
        self.capacity = 1 + queue_size
        self.generation_lock = threading.Lock()
        self._holders = 0
        self._count_lock = threading.Lock()

    def try_enter(self) -> bool:
        with self._count_lock:
            if self._holders >= self.capacity:
                return False
            self._holders += 1
            return True

    def leave(self) -> None:
        with self._count_lock:
            self._holders -= 1

    @property
    def holders(self) -> int:
        return self._holders


@dataclass
class Runtime:
    """A model ready to generate: decoder with its KV cache, tokenizer and where it came from."""

    entry: ModelEntry
    generator: object  # genesis_model.generate.Generator
    tokenizer: object
    source: str
    context: int
    load_seconds: float


class ModelPool:
    def __init__(self, limits: ServeLimits, device: str | None = None, tracking_uri: str | None = None):
        import torch

        self.limits = limits
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        self.tracking_uri = tracking_uri
        self._loaded: OrderedDict[str, Runtime] = OrderedDict()
        self._lines: dict[str, ModelLine] = {}
        self._table_lock = threading.Lock()
        self._load_lock = threading.Lock()  # NOTE: loads run one at a time, so memory holds at most one extra model

    def line(self, model_id: str) -> ModelLine:
        with self._table_lock:
            return self._lines.setdefault(model_id, ModelLine(self.limits.queue_size))

    def loaded_ids(self) -> list[str]:
        with self._table_lock:
            return list(self._loaded)

    def get(self, entry: ModelEntry) -> Runtime:
        """The loaded model for `entry`, loading it (and evicting the least recently used idle one) if needed."""
        with self._table_lock:
            if entry.id in self._loaded:
                self._loaded.move_to_end(entry.id)
                return self._loaded[entry.id]
        with self._load_lock:
            with self._table_lock:
                if entry.id in self._loaded:  # loaded by another request while this one waited
                    self._loaded.move_to_end(entry.id)
                    return self._loaded[entry.id]
                self._make_room()
            runtime = self._load(entry)
            with self._table_lock:
                self._loaded[entry.id] = runtime
            return runtime

    def _make_room(self) -> None:
        while len(self._loaded) >= self.limits.max_loaded_models:
            idle = [model_id for model_id in self._loaded if self._lines[model_id].holders == 0]
            if not idle:
                raise Busy(f"all {len(self._loaded)} loaded models are generating; try again shortly "
                           f"(or raise --max-loaded-models)")
            del self._loaded[idle[0]]  # OrderedDict order = least recently used first

    def _load(self, entry: ModelEntry) -> Runtime:
        from genesis_model.generate import Generator
        from genesis_model.inference import load_checkpoint, load_hf, load_tokenizer

        started = time.perf_counter()
        try:
            if entry.kind in ("checkpoint", "milestone", "archive"):
                loaded = load_checkpoint(entry.location, dtype=self.dtype, device=self.device)
            elif entry.kind == "registry":
                from lineage.registry import resolve_model_uri

                loaded = load_hf(resolve_model_uri(entry.location, self.tracking_uri), dtype=self.dtype,
                                 device=self.device)
            else:
                loaded = load_hf(entry.location, dtype=self.dtype, device=self.device)
            tokenizer = load_tokenizer(loaded.tokenizer_dir, entry.id)
            generator = Generator(loaded.model, compile_decode=self.device == "cuda")
        except GenesisError as err:
            # The visitor sees the model's id, not where it lives on disk.
            raise ModelLoadFailed(f"could not be loaded: {str(err).replace(entry.location, entry.id)}") from None
        except Exception as err:  # noqa: BLE001 - a damaged model file must not take the server down
            reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
            raise ModelLoadFailed(f"{entry.id}: could not be loaded ({type(err).__name__}: {reason})") from None
        return Runtime(entry, generator, tokenizer, loaded.source, loaded.model.config.max_seq_len,
                       time.perf_counter() - started)
