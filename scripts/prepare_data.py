#!/usr/bin/env python
"""Pre-tokenize text into a token shard for fast, O(1)-resumable training.

Writes OUTPUT (raw uint16 ids when the vocab fits, else uint32) and a JSON
sidecar next to it (OUTPUT with suffix .json) giving dtype, token count,
tokenizer and vocab size. Every document is framed as BOS + text + EOS, exactly
as the ``text``/``demo`` data sources do, so a shard and the source it came
from feed the model the same tokens. Train with::

    [data] source = "shards"  path = "OUTPUT"   (a file, a folder of .bin, or a glob)

Examples::

    python scripts/prepare_data.py --source demo --output data/kjv.bin
    python scripts/prepare_data.py --source text --input 'corpus/*.jsonl' --tokenizer cl100k_base --output data/c.bin
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterable
from pathlib import Path

from hydra_titan.components.datasets import (
    demo_corpus_path,
    demo_documents,
    hf_documents,
    iter_file_documents,
    resolve_files,
    sidecar_path,
    write_token_shard,
)
from hydra_titan.components.tokenizer import BUILTIN_TOKENIZERS, build_tokenizer

logger = logging.getLogger("prepare_data")


def _documents(args: argparse.Namespace) -> tuple[Iterable[list[str]], list[str]]:
    if args.source == "demo":
        return ([d] for d in demo_documents()), [str(demo_corpus_path())]
    if args.source == "hf":
        return hf_documents(args.hf_name, args.hf_split, args.text_field), [f"hf:{args.hf_name}:{args.hf_split}"]
    files = [f for spec in args.input for f in resolve_files(spec)]
    return iter_file_documents(files, args.text_field), [str(f) for f in files]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", choices=("text", "demo", "hf"), default="text", help="where documents come from")
    parser.add_argument("--input", nargs="+", default=[], help="text source: .txt/.jsonl files, folders or globs")
    parser.add_argument("--output", required=True, type=Path, help="shard file to write (e.g. data/train.bin)")
    parser.add_argument(
        "--tokenizer", default="kjv_bpe_4k", help=f"one of {', '.join(BUILTIN_TOKENIZERS)} or a .tiktoken path"
    )
    parser.add_argument("--text-field", default="text", help="field of jsonl / HF records holding the text")
    parser.add_argument("--hf-name", default="", help="hf source: dataset name or local path")
    parser.add_argument("--hf-split", default="train", help="hf source: split")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if args.source == "text" and not args.input:
        parser.error("--source text needs --input")
    if args.output.suffix != ".bin":
        parser.error(f"--output must end in .bin (its header goes to {sidecar_path(args.output.with_suffix('.bin'))})")
    existing = [p for p in (args.output, sidecar_path(args.output)) if p.exists()]
    if existing and not args.overwrite:
        parser.error(f"{existing[0]} exists; pass --overwrite to replace it")
    try:
        tokenizer = build_tokenizer(args.tokenizer)
        docs, sources = _documents(args)
        if args.overwrite:
            sidecar_path(args.output).unlink(missing_ok=True)  # no stale header beside a half-written shard
        header = write_token_shard(docs, tokenizer, args.output, sources=sources)
    except (FileNotFoundError, ValueError, KeyError, ImportError) as exc:
        logger.error("prepare_data: %s", exc)
        return 2
    logger.info("%s: %d tokens (%s), tokenizer %s", args.output, header["num_tokens"], header["dtype"], tokenizer.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
