"""SentencePiece BPE tokenizer training, and its exact Hugging Face `tokenizer.json` twin with a chat template.

Training settings and why:
  * identity normalisation, no whitespace collapsing, no dummy prefix: decode(encode(x)) == x, byte for byte;
  * whitespace-only pieces allowed: runs of spaces (code indentation) become single tokens;
  * byte fallback: any character outside the vocab becomes UTF-8 byte pieces, never <unk>;
  * split digits: numbers tokenize digit by digit (better arithmetic, no vocab spent on numbers);
  * unk 0 / bos 1 / eos 2 / pad 3: the ids transformers' Llama conventions assume;
  * chat and tool markers as user-defined symbols, so they are always one token.

The HF tokenizer is built piece by piece from the SentencePiece model (vocab in id order, merges ranked by
the merged piece's id, which is SentencePiece's score order for BPE), then checked against SentencePiece
on real text: a careless conversion once produced 26,936 tokens where SentencePiece produced 15.6M.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from genesis.chat import BOS, CHAT_TEMPLATE, CHAT_TOKENS, EOS, IM_END, IM_START, PAD, UNK
from genesis.errors import DataError
from genesis.manifest import MAX_UINT16_VOCAB

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3



def train_sentencepiece(sentences: Iterable[str], out_dir: str | Path, vocab_size: int = 49_152,
                        threads: int | None = None, max_sentence_bytes: int = 8192) -> Path:
    """Train a SentencePiece BPE model on `sentences` and write `tokenizer.model` plus its HF twin."""
    import sentencepiece as spm

    if vocab_size > MAX_UINT16_VOCAB + 1:
        raise DataError(f"vocab_size {vocab_size}: token shards store uint16 ids; choose at most 65,536")
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model = io.BytesIO()
    sentences = [s[:max_sentence_bytes] for s in sentences if s.strip()]
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
            user_defined_symbols=CHAT_TOKENS,
            max_sentence_length=max_sentence_bytes,
            num_threads=threads or os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as err:
        raise DataError(f"tokenizer training failed: {str(err).splitlines()[0]}; use a smaller vocab_size or more text") from None
    (tmp / "tokenizer.model").write_bytes(model.getvalue())
    write_hf_tokenizer(tmp / "tokenizer.model", tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
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
    tokenizer.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS, "eos_token": IM_END, "unk_token": UNK, "pad_token": PAD,
        "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000,
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    ids = {"unk_id": UNK_ID, "bos_id": BOS_ID, "eos_id": EOS_ID, "pad_id": PAD_ID,
           "chat_eos_id": vocab[IM_END], "im_start_id": vocab[IM_START], "vocab_size": len(vocab)}
    (out_dir / "genesis_tokenizer.json").write_text(json.dumps(ids, indent=2))


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

    def encode(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)
