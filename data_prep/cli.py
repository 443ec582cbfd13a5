"""`genesis data prepare|verify` and `genesis tokenizer train`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from genesis.cli_help import examples


def cmd_prepare(args: argparse.Namespace) -> int:
    from data_prep.executor import share_one_malloc_arena
    from data_prep.pipeline import prepare
    from data_prep.sources import CorpusConfig
    from genesis.config import load_config

    share_one_malloc_arena()  # this process is the stage's driver: before its first thread (see the NOTE there)
    config = load_config(CorpusConfig, args.corpus, args.overrides)
    manifest = prepare(config, args.out)
    report = json.loads((Path(args.out) / "report.json").read_text())
    for source in manifest.sources:
        row = report.get(source.name, {})
        print(f"{source.name:>16}: {source.num_docs:>8,} docs {source.num_tokens:>12,} tokens  weight {source.weight}"
              f"  ({row.get('exact_duplicates_removed', 0):,} exact, {row.get('near_duplicates_removed', 0):,} near "
              f"duplicates removed)")
    timings = report.get("_timings", {})
    print("seconds: " + ", ".join(f"{phase} {seconds:,.1f}" for phase, seconds in timings.items()))
    print(f"wrote {Path(args.out) / 'manifest.json'} ({manifest.num_tokens:,} tokens); per-source counts, duplicates "
          f"and repetition in {Path(args.out) / 'report.json'}; removed documents in "
          f"{Path(args.out) / 'dedup' / 'removed.parquet'}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from genesis.manifest import verify_data_dir

    manifest = verify_data_dir(args.data_dir)
    shards = sum(len(s.shards) for s in manifest.sources)
    print(f"{args.data_dir}: {shards} shards, {manifest.num_tokens:,} tokens, all checksums and counts match, "
          f"every token id below the vocab_size {manifest.tokenizer.vocab_size}")
    return 0


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    import tempfile

    from data_prep.pipeline import stage_clean, tokenizer_sample
    from data_prep.sources import CorpusConfig
    from data_prep.tokenizer import TOKENIZER_FILES, train_sentencepiece
    from genesis.config import load_config
    from genesis.errors import DataError

    config = load_config(CorpusConfig, args.corpus, args.overrides)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: not a directory; --out names the directory to write the tokenizer into")
    # Only the tokenizer's own files are written into --out; replacing another tokenizer's must be asked for.
    present = [name for name in TOKENIZER_FILES if (out / name).exists()]
    if present and not args.force:
        raise DataError(f"{out / present[0]}: a tokenizer is there already ({', '.join(present)}); pass --force to "
                        f"replace those files (nothing else in {out} is touched), or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    # The cleaned corpus is the sample's source: written beside --out (it can be large), removed when done.
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.tokenizer-work-", dir=out.parent) as work:
        stage_clean(config, Path(work))
        model = train_sentencepiece(tokenizer_sample(config, Path(work)), out, vocab_size=config.tokenizer.vocab_size)
    print(json.dumps({"tokenizer": str(model)}))
    return 0


def cmd_tokenizer_hf(args: argparse.Namespace) -> int:
    from data_prep.tokenizer import write_hf_tokenizer
    from genesis.errors import DataError

    model = Path(args.tokenizer_dir) / "tokenizer.model"
    if not model.is_file():
        raise DataError(f"{model}: no SentencePiece model there; name the directory that holds tokenizer.model")
    write_hf_tokenizer(model, model.parent)
    print(json.dumps({"hf_tokenizer": str(model.parent / "tokenizer.json")}))
    return 0


def register(sub) -> None:
    data = sub.add_parser("data", help="the data stage",
                          epilog=examples("genesis data prepare --corpus configs/corpus/builtin.yaml --out data/builtin",
                                          "genesis data verify data/builtin"),
                          ).add_subparsers(dest="data_command", required=True)
    prepare = data.add_parser(
        "prepare", help="sources → clean → dedup → tokenizer → token shards + manifest",
        epilog=examples("genesis data prepare --corpus configs/corpus/builtin.yaml --out data/builtin",
                        "genesis data prepare --corpus configs/corpus/data-kit.yaml --out data/kit workers=8"))
    prepare.add_argument("--corpus", required=True, type=Path, help="configs/corpus/*.yaml")
    prepare.add_argument("--out", required=True, type=Path, help="data directory")
    prepare.add_argument("overrides", nargs="*", help="dotted.key=value")
    prepare.set_defaults(handler=cmd_prepare)
    verify = data.add_parser("verify", help="check shard checksums, counts and token id range against the manifest",
                             epilog=examples("genesis data verify data/builtin"))
    verify.add_argument("data_dir", type=Path)
    verify.set_defaults(handler=cmd_verify)

    tokenizer = sub.add_parser("tokenizer", help="tokenizer tools",
                               epilog=examples("genesis tokenizer train --corpus configs/corpus/builtin.yaml --out tok/",
                                               "genesis tokenizer hf tok/"),
                               ).add_subparsers(dest="tokenizer_command", required=True)
    train = tokenizer.add_parser("train", help="train the SentencePiece BPE tokenizer (+ HF tokenizer.json) on a corpus",
                                 epilog=examples("genesis tokenizer train --corpus configs/corpus/builtin.yaml --out tok/"))
    train.add_argument("--corpus", required=True, type=Path)
    train.add_argument("--out", required=True, type=Path,
                       help="directory for tokenizer.model and its HF twin; nothing else in it is touched")
    train.add_argument("--force", action="store_true", help="replace the tokenizer files --out holds already")
    train.add_argument("overrides", nargs="*")
    train.set_defaults(handler=cmd_tokenizer_train)
    hf = tokenizer.add_parser("hf", help="rewrite the Hugging Face twin (tokenizer.json, tokenizer_config.json, ...) "
                                         "of a directory's tokenizer.model",
                          epilog=examples("genesis tokenizer hf tok/"))
    hf.add_argument("tokenizer_dir", type=Path)
    hf.set_defaults(handler=cmd_tokenizer_hf)
