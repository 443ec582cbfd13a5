"""Token loader: memory-mapped shards → weighted source mixture → packed windows → this rank's batches.

The data order is one global sequence of windows, the same whatever the world size:

* Each source is an endless token stream: its training documents concatenated (each ends in EOS), pass after
  pass (epochs), each pass in an order shuffled from (the source's key, pass).
* Global window w (seq_len + 1 tokens) comes from source s(w), drawn with the mixture weights from
  (seed, w // 4096) in blocks; it is the next unread window of that source's stream.
* Rank r materialises the windows with w % world_size == r. Every rank walks all window indices (cheap
  bookkeeping, no reads), so its state is global and a resume on another world size continues the same
  sequence: the windows of one optimizer step are the same set on 1 or N ranks.

State is (window index, and per source, by name: its cursor). `state_dict()` after step k and
`load_state_dict()` in a new process (same data) yield exactly the batches that step k + 1 would have seen.

Continuing on new data (`continue_from`, what `--reset-data` does): a new mixture (other weights, sources added
or dropped, more shards prepared with the same tokenizer, another window or seed) keeps each source's cursor.
A source's documents are known by (shard sha256, index in the shard), so a source whose shards changed is
still recognised; the documents it has read in its current pass are skipped in the rest of that pass (its
first pass in the new mixture holds only the unread ones, in the order they would have come), then it goes
on pass after pass as before. A document is never read twice in one pass; a source that runs out wraps around
and its repetition (`repetition/<source>`: passes over its data, a float, 1.0 = every document once) rises.
A source missing from the new mixture keeps its cursor in the state, for a later mixture that brings it back.
"""

from __future__ import annotations

import base64
import zlib
from pathlib import Path

import numpy as np
import torch

from genesis.errors import CheckpointError, DataError
from genesis.manifest import Manifest, ShardReader, read_manifest

LOADER_STATE_VERSION = 2
CHOICE_BLOCK = 4096


def pack_mask(mask: np.ndarray | None) -> str:
    """A boolean mask as compact text (bit-packed, deflated, base64): plain types survive any checkpoint."""
    if mask is None or not mask.any():
        return ""
    return base64.b64encode(zlib.compress(np.packbits(mask).tobytes(), 6)).decode("ascii")


def unpack_mask(text: str, n: int) -> np.ndarray:
    if not text:
        return np.zeros(n, dtype=bool)
    bits = np.frombuffer(zlib.decompress(base64.b64decode(text)), dtype=np.uint8)
    return np.unpackbits(bits, count=n).astype(bool)


def pass_order(num_docs: int, key: list[int], shuffle: bool, pass_index: int, skip: np.ndarray | None) -> np.ndarray:
    """The documents of one pass over a source, in reading order (`skip`: documents left out of this pass)."""
    order = np.random.default_rng(list(key) + [pass_index]).permutation(num_docs) if shuffle else np.arange(num_docs)
    return order if skip is None else order[~skip[order]]


class SourceStream:
    """One source's documents as an endless token stream, pass after pass, reshuffled each pass (or in order).

    The stream starts at pass `first_pass`, which leaves out the documents in `skip` (read in that pass before
    the data changed, see `TokenLoader.continue_from`); later passes hold every document."""

    def __init__(self, readers: list[ShardReader], doc_ids: np.ndarray, seed_key: list[int], shuffle: bool):
        shard_sizes = np.array([r.num_docs for r in readers])
        shard_starts = np.concatenate([[0], np.cumsum(shard_sizes)])
        self.readers = readers
        self.doc_shard = np.searchsorted(shard_starts, doc_ids, side="right") - 1
        self.doc_local = doc_ids - shard_starts[self.doc_shard]
        all_lengths = np.concatenate([r.lengths for r in readers])
        self.doc_lengths = all_lengths[doc_ids]
        self.total_tokens = int(self.doc_lengths.sum())
        self.seed_key, self.shuffle = list(seed_key), shuffle
        self.start_at(0, None)

    @property
    def num_docs(self) -> int:
        return len(self.doc_lengths)

    def start_at(self, first_pass: int, skip: np.ndarray | None) -> None:
        """Begin the stream at pass `first_pass` without the documents in `skip` (a bool mask, or None)."""
        if skip is not None and skip.all():  # nothing left in that pass: the next one starts
            first_pass, skip = first_pass + 1, None
        self.first_pass = int(first_pass)
        self.skip = skip if skip is not None and skip.any() else None
        self.skip_text = pack_mask(self.skip)
        self.skipped_tokens = int(self.doc_lengths[self.skip].sum()) if self.skip is not None else 0
        self.first_pass_tokens = self.total_tokens - self.skipped_tokens
        self._layouts: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _layout(self, pass_index: int) -> tuple[np.ndarray, np.ndarray]:
        """(documents in reading order, each one's first token within the pass) of one pass; the last two
        looked up are kept."""
        if pass_index not in self._layouts:
            skip = self.skip if pass_index == self.first_pass else None
            order = pass_order(self.num_docs, self.seed_key, self.shuffle, pass_index, skip)
            starts = np.concatenate([[0], np.cumsum(self.doc_lengths[order])[:-1]])
            if len(self._layouts) >= 2:
                self._layouts.pop(next(iter(self._layouts)))
            self._layouts[pass_index] = (order, starts)
        return self._layouts[pass_index]

    def locate(self, position: int) -> tuple[int, int]:
        """(pass, token offset within that pass) of the stream's token `position`."""
        if position < self.first_pass_tokens:
            return self.first_pass, position
        rest = position - self.first_pass_tokens
        return self.first_pass + 1 + rest // self.total_tokens, rest % self.total_tokens

    def cursor(self, position: int) -> tuple[int, int, int]:
        """(pass, slot in that pass's order, tokens read of the document at that slot) at token `position`."""
        pass_index, offset = self.locate(position)
        _, starts = self._layout(pass_index)
        slot = int(np.searchsorted(starts, offset, side="right") - 1)
        return pass_index, slot, int(offset - starts[slot])

    def epochs(self, position: int) -> float:
        """Passes over the source's documents read by token `position` (1.0: every document once)."""
        pass_index, offset = self.locate(position)
        read = offset + (self.skipped_tokens if pass_index == self.first_pass else 0)
        return pass_index + read / self.total_tokens

    def documents(self):
        for doc_id in range(len(self.doc_lengths)):
            yield self.readers[self.doc_shard[doc_id]].doc(int(self.doc_local[doc_id]))

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the endless stream."""
        pieces = []
        while length > 0:
            pass_index, offset = self.locate(start)
            order, starts = self._layout(pass_index)
            slot = int(np.searchsorted(starts, offset, side="right") - 1)
            doc_id = order[slot]
            doc = self.readers[self.doc_shard[doc_id]].doc(int(self.doc_local[doc_id]))
            within = offset - int(starts[slot])
            piece = doc[within : within + length]
            pieces.append(piece)
            start += len(piece)
            length -= len(piece)
        return np.concatenate(pieces)


class TokenLoader:
    """Batches of (inputs, targets), each (micro_batch, seq_len) int64, for one rank."""

    def __init__(
        self,
        data_dir: str | Path,
        seq_len: int,
        micro_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        holdout_docs_per_source: int = 32,
        manifest: Manifest | None = None,
    ):
        self.data_dir = Path(data_dir)
        self.manifest = manifest or read_manifest(self.data_dir)
        if self.manifest.num_tokens == 0:
            raise DataError(f"{self.data_dir}: the manifest lists no tokens; the corpus was empty after filtering")
        self.seq_len, self.micro_batch_size = seq_len, micro_batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.window = seq_len + 1
        self.source_names = [s.name for s in self.manifest.sources]
        weights = np.array([s.weight for s in self.manifest.sources], dtype=np.float64)
        self.weights = weights / weights.sum()

        self.train_streams: list[SourceStream] = []
        self.val_streams: dict[str, SourceStream] = {}
        # Each source's documents by identity, (shard sha256, documents in it): what a cursor is carried by.
        self.source_shards: list[list[list]] = []
        for index, source in enumerate(self.manifest.sources):
            readers = [ShardReader(self.data_dir / shard.path) for shard in source.shards]
            num_docs = sum(r.num_docs for r in readers)
            if num_docs == 0 or source.num_tokens == 0:
                raise DataError(f"{self.data_dir}: source '{source.name}' has no documents; drop it or re-prepare")
            # The last documents of each source (in manifest order) are held out for validation.
            holdout = min(holdout_docs_per_source, num_docs // 10)
            train_ids = np.arange(num_docs - holdout)
            self.train_streams.append(SourceStream(readers, train_ids, [seed, index], shuffle=True))
            self.source_shards.append([[shard.sha256, reader.num_docs] for shard, reader in zip(source.shards, readers)])
            if holdout:
                val_ids = np.arange(num_docs - holdout, num_docs)
                self.val_streams[source.name] = SourceStream(readers, val_ids, [seed, index], shuffle=False)

        self.window_index = 0
        self.windows_per_source = [0] * len(self.train_streams)
        # Mixtures this loader's position has been carried through (`continue_from`); part of the mixing seed.
        self.segment = 0
        # Cursors of sources the data no longer holds, kept for a later mixture that brings them back.
        self.absent_sources: dict[str, dict] = {}
        self._choice_block, self._choices = -1, None

    # ---------------------------------------------------------------------------------------------------------

    def _source_of(self, window_index: int) -> int:
        block = window_index // CHOICE_BLOCK
        if block != self._choice_block:
            key = [self.seed, 0x6D6978, block] if self.segment == 0 else [self.seed, 0x6D6978, self.segment, block]
            rng = np.random.default_rng(key)  # "mix"
            self._choices = rng.choice(len(self.weights), size=CHOICE_BLOCK, p=self.weights)
            self._choice_block = block
        return int(self._choices[window_index % CHOICE_BLOCK])

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next micro-batch of this rank as (inputs, targets), each micro_batch × (window - 1)."""
        batch = self.next_windows()
        return batch[:, :-1], batch[:, 1:]

    def next_windows(self) -> torch.Tensor:
        """The next micro-batch of this rank as whole windows (micro_batch × window int64; inputs are
        [:, :-1], targets [:, 1:]): one tensor, so it crosses to the GPU in one copy. Every call consumes
        exactly micro_batch × world_size global windows on every rank, so all ranks hold the same position
        after each call."""
        rows = []
        first = self.window_index
        for offset in range(self.micro_batch_size * self.world_size):
            source = self._source_of(first + offset)
            taken = self.windows_per_source[source]
            self.windows_per_source[source] = taken + 1
            if offset % self.world_size == self.rank:
                rows.append(self.train_streams[source].read(taken * self.window, self.window))
        self.window_index = first + self.micro_batch_size * self.world_size
        return torch.from_numpy(np.stack(rows).astype(np.int64))

    def validation_batches(self, batches_per_source: int) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Fixed held-out batches per source, this rank's share (same on every call)."""
        out = {}
        for name, stream in self.val_streams.items():
            batches = []
            for batch_index in range(batches_per_source):
                rows = []
                for row in range(self.micro_batch_size):
                    global_window = (batch_index * self.micro_batch_size + row) * self.world_size + self.rank
                    rows.append(stream.read(global_window * self.window, self.window))
                batch = torch.from_numpy(np.stack(rows).astype(np.int64))
                batches.append((batch[:, :-1], batch[:, 1:]))
            out[name] = batches
        return out

    def repetition(self) -> dict[str, float]:
        """Per source, the passes over its documents read so far (1.0: each once; above: repeated data)."""
        return {name: stream.epochs(taken * self.window)
                for name, stream, taken in zip(self.source_names, self.train_streams, self.windows_per_source)}

    def repetition_metrics(self) -> dict[str, float]:
        """`repetition/<source>` for the step metrics (metrics.jsonl, latest.json, MLflow)."""
        return {f"repetition/{name}": round(value, 6) for name, value in self.repetition().items()}

    # ---------------------------------------------------------------------------------------------------------

    def _source_state(self, index: int) -> dict:
        stream, taken = self.train_streams[index], self.windows_per_source[index]
        position = taken * self.window
        return {
            "key": list(stream.seed_key),
            "shards": [list(shard) for shard in self.source_shards[index]],
            "train_docs": stream.num_docs,
            "first_pass": stream.first_pass,
            "skip": stream.skip_text,
            "windows": taken,
            "cursor": list(stream.cursor(position)),
            "epochs": stream.epochs(position),
        }

    def state_dict(self) -> dict:
        return {
            "version": LOADER_STATE_VERSION,
            "window_index": self.window_index,
            "windows_per_source": list(self.windows_per_source),
            "source_names": list(self.source_names),
            "segment": self.segment,
            "sources": {name: self._source_state(index) for index, name in enumerate(self.source_names)}
                       | {name: dict(state) for name, state in self.absent_sources.items()},
            "data_fingerprint": self.manifest.fingerprint(),
            "seq_len": self.seq_len,
            "seed": self.seed,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where `state` left off. The world size may differ (the order is global; the
        position must fall on a boundary of the new world size, which holds when global batches match); the
        data, window length and seed may not, since the same position would then mean other tokens (data that
        changed is continued with `continue_from`)."""
        if state.get("version") not in (1, LOADER_STATE_VERSION):
            raise CheckpointError(f"loader state version {state.get('version')} is not {LOADER_STATE_VERSION}")
        if state["data_fingerprint"] != self.manifest.fingerprint():
            raise CheckpointError(
                f"{self.data_dir}: data differs from the checkpoint's (fingerprint {state['data_fingerprint']} vs "
                f"{self.manifest.fingerprint()}); resume with the original data_dir, or pass --reset-data to "
                f"continue each source where it stopped on the new data"
            )
        if state["seq_len"] != self.seq_len or state["seed"] != self.seed:
            raise CheckpointError("loader: seq_len or seed differs from the checkpoint's; they fix the data order "
                                  "(--reset-data continues each source where it stopped)")
        if int(state["window_index"]) % self.world_size:
            raise CheckpointError(f"loader: position {state['window_index']} is not a multiple of world size "
                                  f"{self.world_size}; resume on a world size that divides the global batch")
        self.window_index = int(state["window_index"])
        self.windows_per_source = [int(n) for n in state["windows_per_source"]]
        self.segment = int(state.get("segment", 0))
        self._choice_block, self._choices = -1, None
        sources = state.get("sources", {})
        for name, stream in zip(self.source_names, self.train_streams):
            saved = sources.get(name)
            if saved is None:  # version 1: every source at its first pass, nothing skipped
                if stream.first_pass or stream.skip is not None:
                    stream.start_at(0, None)
            elif (list(saved["key"]), saved["first_pass"], saved["skip"]) != (stream.seed_key, stream.first_pass,
                                                                             stream.skip_text):
                stream.seed_key = list(saved["key"])
                stream.start_at(saved["first_pass"], unpack_mask(saved["skip"], stream.num_docs))
        self.absent_sources = {name: dict(saved) for name, saved in sources.items() if name not in self.source_names}

    def continue_from(self, state: dict) -> list[str]:
        """Carry `state`, saved on other data (or the same), into this loader: each source of this data that the
        state knows (by name) continues its current pass with the documents it has not read yet (known by shard
        sha256 and index), then goes on pass after pass; a new source starts at its beginning. The window, seed
        and world size may all differ. Returns notes worth logging (a state too old to carry)."""
        if state.get("version") == 1:
            return self._continue_from_v1(state)
        if state.get("version") != LOADER_STATE_VERSION:
            raise CheckpointError(f"loader state version {state.get('version')} is not {LOADER_STATE_VERSION}")
        saved_sources = dict(state["sources"])
        for index, (name, stream) in enumerate(zip(self.source_names, self.train_streams)):
            saved = saved_sources.pop(name, None)
            if saved is None:
                stream.start_at(0, None)
                continue
            pass_index, read = self._read_in_pass(saved)
            stream.seed_key = list(saved["key"])
            stream.start_at(pass_index, self._map_documents(read, saved["shards"], index))
        self.absent_sources = saved_sources
        self.window_index = 0
        self.windows_per_source = [0] * len(self.train_streams)
        self.segment = int(state.get("segment", 0)) + 1
        self._choice_block, self._choices = -1, None
        return []

    @staticmethod
    def _read_in_pass(saved: dict) -> tuple[int, np.ndarray]:
        """(the pass a saved source was in, the documents of its saved identity read in that pass)."""
        pass_index, slot, within = (int(n) for n in saved["cursor"])
        num_docs = int(saved["train_docs"])
        skip = unpack_mask(saved["skip"], num_docs) if pass_index == int(saved["first_pass"]) else None
        order = pass_order(num_docs, saved["key"], True, pass_index, skip if skip is not None and skip.any() else None)
        read = np.zeros(num_docs, dtype=bool) if skip is None else skip.copy()
        read[order[: slot + (1 if within > 0 else 0)]] = True  # a document begun counts as read
        return pass_index, read

    def _map_documents(self, read: np.ndarray, saved_shards: list, index: int) -> np.ndarray:
        """`read` (over a saved source's training documents) as a mask over source `index`'s training documents:
        a document is the same when its shard (sha256) and its index in the shard are."""
        here: dict[str, int] = {}
        start = 0
        for sha256, num_docs in self.source_shards[index]:
            here.setdefault(sha256, start)
            start += int(num_docs)
        mapped = np.zeros(self.train_streams[index].num_docs, dtype=bool)
        start = 0
        for sha256, num_docs in saved_shards:
            num_docs = int(num_docs)
            ids = np.flatnonzero(read[start : start + num_docs]) if start < len(read) else np.zeros(0, np.int64)
            if sha256 in here and len(ids):
                new_ids = here[sha256] + ids
                mapped[new_ids[new_ids < len(mapped)]] = True
            start += num_docs
        return mapped

    def _continue_from_v1(self, state: dict) -> list[str]:
        """A state saved before per-source cursors (positions by source index, no document identity): carried
        exactly when it was saved on this data with this seed; otherwise every source starts at its beginning."""
        if state["data_fingerprint"] != self.manifest.fingerprint() or state["seed"] != self.seed:
            for stream in self.train_streams:
                stream.start_at(0, None)
            self.window_index, self.windows_per_source = 0, [0] * len(self.train_streams)
            self.segment, self._choice_block, self._choices = 1, -1, None
            return ["the checkpoint's loader state predates per-source cursors and was saved on other data: "
                    "every source starts at its beginning"]
        window = int(state["seq_len"]) + 1
        old = {"version": LOADER_STATE_VERSION, "segment": 0, "sources": {}}
        for index, (name, stream) in enumerate(zip(self.source_names, self.train_streams)):
            stream.start_at(0, None)
            taken = int(state["windows_per_source"][index])
            old["sources"][name] = {"key": list(stream.seed_key), "shards": self.source_shards[index],
                                    "train_docs": stream.num_docs, "first_pass": 0, "skip": "",
                                    "cursor": list(stream.cursor(taken * window))}
        return self.continue_from(old)


def unigram_cross_entropy(loader: TokenLoader) -> float:
    """The baseline a language model must beat: cross-entropy (nats/token) of the training set's unigram
    distribution (add-one smoothed) on each source's held-out tokens, averaged over sources the way the
    trainer averages its per-source validation losses."""
    vocab_size = loader.manifest.tokenizer.vocab_size
    counts = np.zeros(vocab_size, dtype=np.float64)
    for stream in loader.train_streams:
        for doc in stream.documents():
            counts += np.bincount(doc, minlength=vocab_size)[:vocab_size]
    log_probs = np.log((counts + 1) / (counts.sum() + vocab_size))
    per_source = []
    for stream in loader.val_streams.values():
        tokens = np.concatenate(list(stream.documents()))
        per_source.append(float(-log_probs[tokens[1:]].mean()))
    return sum(per_source) / len(per_source)
