#!/usr/bin/env python
"""Held-out loss, perplexity and bits-per-byte of a checkpoint on a text, jsonl or token-shard file.

    python scripts/evaluate.py --checkpoint outputs/debug/checkpoint --data held_out.txt
    python scripts/evaluate.py --checkpoint export/ --data "data/val/*.bin" --seq-len 1024 --max-tokens 1000000

Text (.txt, .jsonl, optionally .gz) is tokenized like training data (BOS + document + EOS, one
stream); a .bin shard written by prepare_data is read as it is (its tokenizer must be the
checkpoint's). The stream is cut into windows of seq_len + 1 tokens, each token predicted once,
with eval (causal, threshold) routing. Bits per byte = summed nats / ln 2 / UTF-8 bytes of the
predicted tokens (special tokens count 0 bytes), so models with different tokenizers compare.
Exit status 2 for a bad checkpoint path or data path.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hydra_titan.components.datasets import token_documents  # noqa: E402
from generate import add_model_arguments, load  # noqa: E402


def token_stream(data: str, tokenizer) -> np.ndarray:
    """Every token of the files `data` names, in order."""
    parts = [np.asarray(doc, dtype=np.int64) for doc in token_documents(data, tokenizer)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


@torch.no_grad()
def evaluate(model, tokens: np.ndarray, token_bytes: torch.Tensor, seq_len: int, batch: int,
             device: torch.device) -> dict[str, float]:
    windows = [tokens[i:i + seq_len + 1] for i in range(0, len(tokens) - 1, seq_len)]
    nats, count, n_bytes = 0.0, 0, 0
    for start in range(0, len(windows), batch):
        group = windows[start:start + batch]
        width = max(len(w) for w in group)
        padded = torch.full((len(group), width), -100, dtype=torch.long)
        for i, w in enumerate(group):
            padded[i, :len(w)] = torch.from_numpy(w)
        padded = padded.to(device)
        inputs, labels = padded[:, :-1].clamp_min(0), padded[:, 1:]
        logits = model(inputs)["logits"].float()
        nats += F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum").item()
        keep = labels != -100
        count += int(keep.sum())
        n_bytes += int((token_bytes[labels.clamp_min(0)] * keep).sum())
    loss = nats / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700)), "bits_per_byte": nats / math.log(2) / max(n_bytes, 1),
            "tokens": count, "bytes": n_bytes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--data", required=True, help="a .txt/.jsonl(.gz) or .bin file, folder or glob")
    parser.add_argument("--seq-len", type=int, default=0, help="window length (default: the model's max_seq_len)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=0, help="score at most this many tokens (0: all)")
    parser.add_argument("--json", default="", help="also write the figures here")
    opts = parser.parse_args(argv)
    if opts.seq_len < 0 or opts.batch < 1 or opts.max_tokens < 0:
        parser.error("--seq-len and --max-tokens must be >= 0 and --batch >= 1")
    model, tokenizer, device = load(parser, opts)
    seq_len = opts.seq_len or model.args.max_seq_len
    if seq_len > model.args.max_seq_len:
        parser.error(f"--seq-len {seq_len} exceeds the model's max_seq_len {model.args.max_seq_len}")
    try:
        tokens = token_stream(opts.data, tokenizer)
    except (FileNotFoundError, ValueError) as e:
        parser.error(str(e))
    if opts.max_tokens:
        tokens = tokens[:opts.max_tokens + 1]
    if len(tokens) < 2:
        parser.error(f"{opts.data} holds fewer than 2 tokens")
    token_bytes = torch.tensor(tokenizer.byte_lengths(), device=device)
    result = evaluate(model, tokens, token_bytes, seq_len, opts.batch, device)
    print(f"loss {result['loss']:.4f}  perplexity {result['perplexity']:.2f}  bits/byte {result['bits_per_byte']:.4f}"
          f"  ({result['tokens']} tokens, {result['bytes']} bytes, seq_len {seq_len})")
    if opts.json:
        Path(opts.json).write_text(json.dumps(result) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
