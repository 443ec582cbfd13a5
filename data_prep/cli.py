"""`genesis data prepare|verify` and `genesis tokenizer train`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def cmd_prepare(args: argparse.Namespace) -> int:
    from data_prep.pipeline import prepare
    from data_prep.sources import CorpusConfig
    from genesis.config import load_config

    config = load_config(CorpusConfig, args.corpus, args.overrides)
    manifest = prepare(config, args.out)
    for source in manifest.sources:
        print(f"{source.name:>16}: {source.num_docs:>8,} docs {source.num_tokens:>12,} tokens  weight {source.weight}")
    print(f"wrote {Path(args.out) / 'manifest.json'} ({manifest.num_tokens:,} tokens)")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from genesis.manifest import verify_data_dir

    manifest = verify_data_dir(args.data_dir)
    shards = sum(len(s.shards) for s in manifest.sources)
    print(f"{args.data_dir}: {shards} shards, {manifest.num_tokens:,} tokens, all checksums and counts match, "
          f"every token id below the vocab_size {manifest.tokenizer.vocab_size}")
    return 0


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from data_prep.pipeline import clean_and_dedup, tokenizer_sample
    from data_prep.sources import CorpusConfig
    from data_prep.tokenizer import train_sentencepiece
    from genesis.config import load_config

    config = load_config(CorpusConfig, args.corpus, args.overrides)
    work = Path(args.out) / "_sample"
    clean_and_dedup(config, work)
    model = train_sentencepiece(tokenizer_sample(config, work), args.out, vocab_size=config.tokenizer.vocab_size)
    print(json.dumps({"tokenizer": str(model)}))
    return 0


def register(sub) -> None:
    data = sub.add_parser("data", help="the data stage").add_subparsers(dest="data_command", required=True)
    prepare = data.add_parser("prepare", help="sources → clean → dedup → tokenizer → token shards + manifest")
    prepare.add_argument("--corpus", required=True, type=Path, help="configs/corpus/*.yaml")
    prepare.add_argument("--out", required=True, type=Path, help="data directory")
    prepare.add_argument("overrides", nargs="*", help="dotted.key=value")
    prepare.set_defaults(handler=cmd_prepare)
    verify = data.add_parser("verify", help="check shard checksums, counts and token id range against the manifest")
    verify.add_argument("data_dir", type=Path)
    verify.set_defaults(handler=cmd_verify)

    tokenizer = sub.add_parser("tokenizer", help="tokenizer tools").add_subparsers(dest="tokenizer_command", required=True)
    train = tokenizer.add_parser("train", help="train the SentencePiece BPE tokenizer (+ HF tokenizer.json) on a corpus")
    train.add_argument("--corpus", required=True, type=Path)
    train.add_argument("--out", required=True, type=Path)
    train.add_argument("overrides", nargs="*")
    train.set_defaults(handler=cmd_tokenizer_train)
