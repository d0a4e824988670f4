#!/usr/bin/env python
"""Train a small byte-level BPE offline and write it as a tiktoken ranks file.

Training uses the ``tokenizers`` package (ByteLevel pre-tokenizer, i.e. the
GPT-2 split regex); the result is converted to tiktoken ranks so the project
needs only tiktoken at run time. The shipped ``hydra_titan/assets/kjv_bpe_4k.tiktoken``
was made with the defaults:

    python scripts/train_tokenizer.py --output hydra_titan/assets/kjv_bpe_4k.tiktoken --overwrite

Rank == the ``tokenizers`` id (bytes first, then merges in training order), so
the two tokenizers give the same ids; tests/components/test_tokenizer.py checks it.
"""

from __future__ import annotations

import argparse
import base64
import logging
import sys
from collections.abc import Iterable
from pathlib import Path

logger = logging.getLogger("train_tokenizer")

# 4094 BPE ranks + <|begin_of_text|> + <|end_of_text|> = 4096 embedding rows.
DEFAULT_VOCAB_SIZE = 4094


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode map used by ByteLevel BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def train_bpe(texts: Iterable[str], vocab_size: int):
    """A ``tokenizers.Tokenizer`` (byte-level BPE) with exactly ``vocab_size`` tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 256:
        raise ValueError(f"vocab_size must be >= 256 (the byte tokens), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def to_tiktoken_ranks(tok) -> dict[bytes, int]:
    """Map each byte-level token string back to bytes; rank = tokenizers id."""
    decode = {c: b for b, c in bytes_to_unicode().items()}
    ranks = {bytes(decode[ch] for ch in token): idx for token, idx in tok.get_vocab().items()}
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError("tokenizers vocab ids are not 0..n-1; cannot convert to tiktoken ranks")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(f"trained vocab lacks {len(missing)} single-byte tokens")
    return ranks


def write_tiktoken(ranks: dict[bytes, int], path: Path) -> None:
    """``base64(token) rank`` per line, in rank order (tiktoken's .tiktoken format)."""
    lines = [f"{base64.b64encode(tok).decode('ascii')} {rank}\n" for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1])]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(lines), encoding="ascii")
    tmp.replace(path)


def _corpus(inputs: list[str], text_field: str) -> list[str]:
    from hydra_titan.components.datasets import demo_documents, iter_file_documents, resolve_files

    if not inputs:
        return demo_documents()
    texts: list[str] = []
    for spec in inputs:
        for doc in iter_file_documents(resolve_files(spec), text_field):
            texts.extend(doc)
    return texts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="*", help="text/jsonl files, folders or globs (default: the KJV demo corpus)")
    parser.add_argument("--output", required=True, type=Path, help="the .tiktoken file to write")
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE, help="BPE ranks incl. the 256 bytes (specials come on top)")
    parser.add_argument("--text-field", default="text", help="field of jsonl records holding the text")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if args.output.exists() and not args.overwrite:
        parser.error(f"{args.output} exists; pass --overwrite to replace it")
    texts = _corpus(args.inputs, args.text_field)
    tok = train_bpe(texts, args.vocab_size)
    ranks = to_tiktoken_ranks(tok)
    write_tiktoken(ranks, args.output)
    logger.info("wrote %s: %d ranks, %d bytes", args.output, len(ranks), args.output.stat().st_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
