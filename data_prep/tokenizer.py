"""SentencePiece BPE tokenizer training, and its exact Hugging Face `tokenizer.json` twin with a chat template.

Training settings and why:
  * identity normalisation, no whitespace collapsing, no dummy prefix: decode(encode(x)) == x, byte for byte;
  * whitespace-only pieces allowed: runs of spaces (code indentation) become single tokens;
  * byte fallback: any character outside the vocab becomes UTF-8 byte pieces, never <unk>;
  * split digits: numbers tokenize digit by digit (better arithmetic, no vocab spent on numbers);
  * unk 0 / bos 1 / eos 2 / pad 3: the ids transformers' Llama conventions assume;
  * chat and tool markers as control symbols: one token each where the chat template writes them, and never
    produced from text, so a document or a user quoting "<|im_end|>" gets its characters (issue #24);
  * no piece spans a line break or a marker: training text is cut at both, so the ids of a conversation do not
    depend on whether its segments are encoded one by one (`genesis.chat.encode_chat`) or as one pretraining
    string (`encode_documents`).

Pretraining text marks the template's markers with sentinels (`genesis.chat.render_chat_for_pretraining`);
`encode_documents` is the one way to turn such text into token ids.

The HF tokenizer is built piece by piece from the SentencePiece model (vocab in id order, merges ranked by
the merged piece's id, which is SentencePiece's score order for BPE), then checked against SentencePiece
on real text: a careless conversion once produced 26,936 tokens where SentencePiece produced 15.6M. Encoding
text with `split_special_tokens=True` it gives SentencePiece's ids on any string, special strings included;
`tokenizer_config.json` leaves it off, so a plain transformers or llama.cpp user's chat template still gets its
markers (as with every ChatML model, such a user's own string encoding cannot tell quoted markers apart).
"""

from __future__ import annotations

import io
import json
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path

from genesis.chat import (BOS, CHAT_TEMPLATE, CHAT_TOKENS, EOS, IM_END, IM_START, PAD, SENTINEL_MARKERS,
                          SENTINEL_PATTERN, UNK)
from genesis.errors import DataError
from genesis.manifest import MAX_UINT16_VOCAB

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
# What `train_sentencepiece` writes into its directory (and nothing else there is touched).
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "genesis_tokenizer.json")
# Where training text is cut: line breaks, and the sentinels of template markers (never learned as text).
_TRAINING_CUTS = re.compile("[\n\uFDD0-\uFDEF]")


def train_sentencepiece(sentences: Iterable[str], out_dir: str | Path, vocab_size: int = 49_152,
                        threads: int | None = None, max_sentence_bytes: int = 8192) -> Path:
    """Train a SentencePiece BPE model on `sentences` and write `tokenizer.model` plus its HF twin into `out_dir`.

    Only the files of `TOKENIZER_FILES` are written (replacing those of an earlier tokenizer); whatever else
    `out_dir` holds stays. Each file is written in full and renamed into place."""
    import sentencepiece as spm

    if vocab_size > MAX_UINT16_VOCAB + 1:
        raise DataError(f"vocab_size {vocab_size}: token shards store uint16 ids; choose at most 65,536")
    out_dir = Path(out_dir)
    model = io.BytesIO()
    sentences = [piece[:max_sentence_bytes] for sentence in sentences for piece in _TRAINING_CUTS.split(sentence)
                 if piece.strip()]
    if not sentences:
        raise DataError("tokenizer training: no text to learn from; the corpus is empty after filtering")
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,
            split_digits=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            split_by_whitespace=True,
            character_coverage=0.9995,
            unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID,
            unk_piece=UNK, bos_piece=BOS, eos_piece=EOS, pad_piece=PAD,
            control_symbols=CHAT_TOKENS,
            max_sentence_length=max_sentence_bytes,
            num_threads=threads or os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as err:
        raise DataError(f"tokenizer training failed: {str(err).splitlines()[0]}; use a smaller vocab_size or more text") from None
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".tokenizer-", dir=out_dir) as work:
        work = Path(work)
        (work / "tokenizer.model").write_bytes(model.getvalue())
        write_hf_tokenizer(work / "tokenizer.model", work)
        # tokenizer.model last: beside a complete HF twin, its presence means the tokenizer is whole.
        for name in sorted(TOKENIZER_FILES, key=lambda name: name == "tokenizer.model"):
            os.replace(work / name, out_dir / name)
    return out_dir / "tokenizer.model"


def _bpe_merges(vocab: dict[str, int], skip: set[str]) -> list[tuple[str, str]]:
    candidates = []
    for piece, piece_id in vocab.items():
        if piece in skip:
            continue
        for split in range(1, len(piece)):
            left, right = piece[:split], piece[split:]
            if left in vocab and right in vocab and left not in skip and right not in skip:
                candidates.append((piece_id, vocab[left], vocab[right], left, right))
    candidates.sort()
    return [(left, right) for _, _, _, left, right in candidates]


def write_hf_tokenizer(model_path: Path, out_dir: Path) -> None:
    """`tokenizer.json`, `tokenizer_config.json` (with the chat template) and genesis ids beside the model."""
    import sentencepiece as spm
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    special = {sp.id_to_piece(i) for i in range(sp.get_piece_size())
               if sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i)} | set(CHAT_TOKENS)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=_bpe_merges(vocab, special), unk_token=UNK,
                                     byte_fallback=True, fuse_unk=True, dropout=None))
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    # NOTE: with allow_whitespace_only_pieces, SentencePiece's words are a run of "▁" followed by the non-"▁"
    # characters after it (a run of spaces stays with the word it precedes, so code indentation can become
    # one "▁▁▁▁" piece); split_digits then isolates digits. The regex reproduces exactly that split.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex("▁*[^▁]+|▁+"), behavior="isolated"),
        pre_tokenizers.Digits(individual_digits=True),
    ])
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in [UNK, BOS, EOS, PAD]])
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in CHAT_TOKENS])
    files = {"tokenizer.json": tokenizer.to_str(pretty=True)}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS, "eos_token": IM_END, "unk_token": UNK, "pad_token": PAD,
        "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000,
        "chat_template": CHAT_TEMPLATE,
    }
    files["tokenizer_config.json"] = json.dumps(config, indent=2)
    files["chat_template.jinja"] = CHAT_TEMPLATE
    ids = {"unk_id": UNK_ID, "bos_id": BOS_ID, "eos_id": EOS_ID, "pad_id": PAD_ID,
           "chat_eos_id": vocab[IM_END], "im_start_id": vocab[IM_START], "vocab_size": len(vocab)}
    files["genesis_tokenizer.json"] = json.dumps(ids, indent=2)
    for name, text in files.items():  # each whole or absent: a rewrite interrupted midway breaks nothing
        tmp = out_dir / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out_dir / name)


# ---------------------------------------------------------------------------------------------------------------
# Encoding


def _matched_in_text(processor, marker: str) -> bool:
    """Whether `marker` is a piece of `processor` that SentencePiece matches in text (a user-defined symbol)."""
    piece_id = processor.piece_to_id(marker)
    return processor.id_to_piece(piece_id) == marker and not processor.is_control(piece_id)


_TEXT_PROCESSORS: dict[int, tuple] = {}


def text_processor(processor):
    """`processor`, or, for a tokenizer whose chat markers are user-defined symbols (trained before they were
    control symbols, e.g. a trunk's), the same model with them as control symbols: ids, pieces and scores stay,
    only a marker quoted in text is now encoded as its characters, as a current tokenizer encodes it. Text without
    quoted markers gets the ids it always got, so such a trunk's tokenizer keeps working unchanged."""
    cached = _TEXT_PROCESSORS.get(id(processor))
    if cached is not None and cached[0] is processor:
        return cached[1]
    converted = processor
    if any(_matched_in_text(processor, marker) for marker in CHAT_TOKENS):
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2 as model_pb2

        proto = model_pb2.ModelProto()
        proto.ParseFromString(processor.serialized_model_proto())
        for piece in proto.pieces:
            if piece.piece in CHAT_TOKENS and piece.type == model_pb2.ModelProto.SentencePiece.USER_DEFINED:
                piece.type = model_pb2.ModelProto.SentencePiece.CONTROL
        converted = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    _TEXT_PROCESSORS[id(processor)] = (processor, converted)
    return converted


def _marker_ids(processor) -> dict[str, int]:
    """Sentinel → marker id; a tokenizer without the chat markers cannot encode a conversation."""
    ids = {}
    for sentinel, marker in SENTINEL_MARKERS.items():
        piece_id = processor.piece_to_id(marker)
        if processor.id_to_piece(piece_id) != marker:
            raise DataError(f"the tokenizer has no {marker} piece, so it cannot encode conversations; use a tokenizer "
                            f"trained by Genesis (genesis tokenizer train) or set tokenizer.retrain=true")
        ids[sentinel] = piece_id
    return ids


def encode_documents(processor, texts: list[str], num_threads: int = 1) -> list[list[int]]:
    """Token ids of pretraining texts (without EOS), for a `sentencepiece.SentencePieceProcessor`.

    Text is always encoded as text: a quoted "<|im_end|>" or "<|endoftext|>" becomes its characters, with this
    tokenizer and with one trained when the markers were user-defined symbols (`text_processor`). Only the
    sentinels `genesis.chat.render_chat_for_pretraining` writes for the chat template's markers become the
    marker ids; the text between them is encoded run by run. A document without sentinels is encoded exactly as
    `processor.encode` would encode it (the batch goes to SentencePiece in one call, `num_threads` threads)."""
    encoder = text_processor(processor)
    runs: list[str] = []
    # Per document: the index of its one run, or its parts in order, each (True, marker id) or (False, run index).
    layouts: list[int | list[tuple[bool, int]]] = []
    marker_ids = None
    for text in texts:
        if SENTINEL_PATTERN.search(text) is None:
            layouts.append(len(runs))
            runs.append(text)
            continue
        marker_ids = marker_ids or _marker_ids(processor)
        parts = []
        start = 0
        for match in SENTINEL_PATTERN.finditer(text):
            if match.start() > start:
                parts.append((False, len(runs)))
                runs.append(text[start:match.start()])
            if match.group() in marker_ids:  # the rest of the reserved range stands for nothing: dropped
                parts.append((True, marker_ids[match.group()]))
            start = match.end()
        if start < len(text):
            parts.append((False, len(runs)))
            runs.append(text[start:])
        layouts.append(parts)
    encoded = encoder.encode(runs, num_threads=num_threads) if runs else []
    documents = []
    for layout in layouts:
        if isinstance(layout, int):
            documents.append(encoded[layout])
            continue
        ids: list[int] = []
        for is_marker, value in layout:
            if is_marker:
                ids.append(value)
            else:
                ids += encoded[value]
        documents.append(ids)
    return documents


def encode_chat_sentencepiece(processor, messages: list[dict], tools: list | None = None,
                              add_generation_prompt: bool = False) -> list[int]:
    """Token ids of a conversation for SentencePiece: the same ids as `genesis.chat.encode_chat` gives with the
    HF twin, and as the pretraining shards hold for it."""
    from genesis.chat import render_chat_segments, sentinel_text

    return encode_documents(processor, [sentinel_text(render_chat_segments(messages, tools, add_generation_prompt))])[0]


class SentencePieceTokenizer:
    """The training-side tokenizer (fast, C++): what the shards are made with."""

    def __init__(self, model_path: str | Path):
        import sentencepiece as spm

        self.path = Path(model_path)
        if not self.path.is_file():
            raise DataError(f"{self.path}: tokenizer model missing; run `genesis tokenizer train` first")
        self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        self.vocab_size = self.sp.get_piece_size()
        self.eos_id = self.sp.eos_id()
        self._marker_of_id = {self.sp.piece_to_id(marker): marker for marker in CHAT_TOKENS
                              if self.sp.id_to_piece(self.sp.piece_to_id(marker)) == marker}

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Pretraining texts as token ids (`encode_documents`)."""
        return encode_documents(self.sp, texts)

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`, the chat markers written out (SentencePiece itself decodes control ids to nothing)."""
        pieces, run = [], []
        for token_id in ids:
            if token_id in self._marker_of_id:
                pieces += [self.sp.decode(run), self._marker_of_id[token_id]]
                run = []
            else:
                run.append(token_id)
        pieces.append(self.sp.decode(run))
        return "".join(pieces)
