"""Token loader: memory-mapped shards → weighted source mixture → packed windows → this rank's batches.

The data order is one global sequence of windows, the same whatever the world size:

* Each source is an endless token stream: its training documents concatenated (each ends in EOS) in an
  order reshuffled every epoch from (seed, source, epoch).
* Global window w (seq_len + 1 tokens) comes from source s(w), drawn with the mixture weights from
  (seed, w // 4096) in blocks; it is the next unread window of that source's stream.
* Rank r materialises the windows with w % world_size == r. Every rank walks all window indices (cheap
  bookkeeping, no reads), so its state is global and a resume on another world size continues the same
  sequence: the windows of one optimizer step are the same set on 1 or N ranks.

State is (window index, windows taken per source): `state_dict()` after step k and `load_state_dict()` in
a new process yield exactly the batches that step k + 1 would have seen.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from genesis.errors import CheckpointError, DataError
from genesis.manifest import Manifest, ShardReader, read_manifest

LOADER_STATE_VERSION = 1
CHOICE_BLOCK = 4096


class SourceStream:
    """One source's documents as an endless token stream, reshuffled each epoch (or in order if not)."""

    def __init__(self, readers: list[ShardReader], doc_ids: np.ndarray, seed_key: list[int], shuffle: bool):
        shard_sizes = np.array([r.num_docs for r in readers])
        shard_starts = np.concatenate([[0], np.cumsum(shard_sizes)])
        self.readers = readers
        self.doc_shard = np.searchsorted(shard_starts, doc_ids, side="right") - 1
        self.doc_local = doc_ids - shard_starts[self.doc_shard]
        all_lengths = np.concatenate([r.lengths for r in readers])
        self.doc_lengths = all_lengths[doc_ids]
        self.total_tokens = int(self.doc_lengths.sum())
        self.seed_key, self.shuffle = seed_key, shuffle
        self._epoch = -1
        self._order = self._starts = None

    def _set_epoch(self, epoch: int) -> None:
        if epoch == self._epoch:
            return
        n = len(self.doc_lengths)
        if self.shuffle:
            self._order = np.random.default_rng(self.seed_key + [epoch]).permutation(n)
        else:
            self._order = np.arange(n)
        self._starts = np.concatenate([[0], np.cumsum(self.doc_lengths[self._order])[:-1]])
        self._epoch = epoch

    def documents(self):
        for doc_id in range(len(self.doc_lengths)):
            yield self.readers[self.doc_shard[doc_id]].doc(int(self.doc_local[doc_id]))

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the endless stream."""
        pieces = []
        while length > 0:
            epoch, offset = divmod(start, self.total_tokens)
            self._set_epoch(epoch)
            slot = int(np.searchsorted(self._starts, offset, side="right") - 1)
            doc_id = self._order[slot]
            doc = self.readers[self.doc_shard[doc_id]].doc(int(self.doc_local[doc_id]))
            within = offset - int(self._starts[slot])
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
        for index, source in enumerate(self.manifest.sources):
            readers = [ShardReader(self.data_dir / shard.path) for shard in source.shards]
            num_docs = sum(r.num_docs for r in readers)
            if num_docs == 0 or source.num_tokens == 0:
                raise DataError(f"{self.data_dir}: source '{source.name}' has no documents; drop it or re-prepare")
            # The last documents of each source (in manifest order) are held out for validation.
            holdout = min(holdout_docs_per_source, num_docs // 10)
            train_ids = np.arange(num_docs - holdout)
            self.train_streams.append(SourceStream(readers, train_ids, [seed, index], shuffle=True))
            if holdout:
                val_ids = np.arange(num_docs - holdout, num_docs)
                self.val_streams[source.name] = SourceStream(readers, val_ids, [seed, index], shuffle=False)

        self.window_index = 0
        self.windows_per_source = [0] * len(self.train_streams)
        self._choice_block, self._choices = -1, None

    # ---------------------------------------------------------------------------------------------------------

    def _source_of(self, window_index: int) -> int:
        block = window_index // CHOICE_BLOCK
        if block != self._choice_block:
            rng = np.random.default_rng([self.seed, 0x6D6978, block])  # "mix"
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

    # ---------------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "version": LOADER_STATE_VERSION,
            "window_index": self.window_index,
            "windows_per_source": list(self.windows_per_source),
            "source_names": list(self.source_names),
            "data_fingerprint": self.manifest.fingerprint(),
            "seq_len": self.seq_len,
            "seed": self.seed,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where `state` left off. The world size may differ (the order is global; the
        position must fall on a boundary of the new world size, which holds when global batches match); the
        data, window length and seed may not, since the same position would then mean other tokens."""
        if state.get("version") != LOADER_STATE_VERSION:
            raise CheckpointError(f"loader state version {state.get('version')} is not {LOADER_STATE_VERSION}")
        if state["data_fingerprint"] != self.manifest.fingerprint():
            raise CheckpointError(
                f"{self.data_dir}: data differs from the checkpoint's (fingerprint {state['data_fingerprint']} vs "
                f"{self.manifest.fingerprint()}); resume with the original data_dir or pass --reset-data"
            )
        if state["seq_len"] != self.seq_len or state["seed"] != self.seed:
            raise CheckpointError("loader: seq_len or seed differs from the checkpoint's; they fix the data order")
        if int(state["window_index"]) % self.world_size:
            raise CheckpointError(f"loader: position {state['window_index']} is not a multiple of world size "
                                  f"{self.world_size}; resume on a world size that divides the global batch")
        self.window_index = int(state["window_index"])
        self.windows_per_source = [int(n) for n in state["windows_per_source"]]


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
