#!/usr/bin/env python
"""Decode speed: cached generation against recomputing the whole sequence each step.

For each model and batch: a random prompt of --prompt-len tokens per row, then --new-tokens greedy
tokens, timed end to end (prefill included), with the decode cache and without it. Random weights:
the speed of a step does not depend on what was learned (threshold routing of a trained HYDRA
keeps fewer tokens than an untrained one's ~50 %, so its figure here is conservative).

    python scripts/decode_benchmark.py --cases hydra:1B llama:1B --batch 1 16 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hydra_titan.components.generation import generate  # noqa: E402
from hydra_titan.models import get_model_spec  # noqa: E402


def build(case: str, device: torch.device, dtype: torch.dtype, max_len: int) -> torch.nn.Module:
    name, flavor = case.split(":")
    spec = get_model_spec(name)
    with torch.device("meta"):
        model = spec.build(flavor, max_seq_len=max(max_len, spec.args(flavor).max_seq_len))
    model.to_empty(device=device)
    model.init_weights(device)
    model.to(dtype)
    model.init_buffers(device)  # the RoPE table stays fp32
    return model.eval()


def timed(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["hydra:1B", "llama:1B"])
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--recompute-tokens", type=int, default=0,
                        help="time the recompute path over this many new tokens (0: all); fewer make its "
                             "tokens/s an overestimate, so the cache's speed-up a lower bound")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default="decode_benchmark.json")
    opts = parser.parse_args()
    device, dtype = torch.device(opts.device), getattr(torch, opts.dtype)
    header = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
              "dtype": opts.dtype, "prompt_len": opts.prompt_len, "new_tokens": opts.new_tokens}
    print(json.dumps(header), flush=True)
    rows = []
    for case in opts.cases:
        model = build(case, device, dtype, opts.prompt_len + opts.new_tokens)
        vocab = model.args.vocab_size
        for batch in opts.batch:
            gen = torch.Generator().manual_seed(batch)
            prompts = torch.randint(0, vocab, (batch, opts.prompt_len), generator=gen).tolist()
            generate(model, prompts, 4, temperature=0)  # warm-up: kernels, allocator
            n_re = opts.recompute_tokens or opts.new_tokens
            row = {"case": case, "batch": batch}
            out: dict[str, list] = {}
            row["cached_s"] = timed(lambda: out.setdefault("c", generate(model, prompts, opts.new_tokens,
                                                                         temperature=0)))
            row["recompute_s"] = timed(lambda: out.setdefault("r", generate(model, prompts, n_re, temperature=0,
                                                                            use_cache=False)))
            row["cached_tok_s"] = batch * opts.new_tokens / row["cached_s"]
            row["recompute_tok_s"] = batch * n_re / row["recompute_s"]
            row["recompute_new_tokens"] = n_re
            row["speedup"] = row["cached_tok_s"] / row["recompute_tok_s"]
            row["same_greedy_tokens"] = all(c[:n_re] == r for c, r in zip(out["c"], out["r"]))
            rows.append(row)
            print(json.dumps(row), flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    by = {(r["case"], r["batch"]): r for r in rows}
    for (case, batch), r in by.items():
        baseline = by.get((f"llama:{case.split(':')[1]}", batch))
        if baseline is not None and r is not baseline:
            print(f"batch {batch}: {case} / llama cached tokens/s = {r['cached_tok_s'] / baseline['cached_tok_s']:.2f}")
    Path(opts.json).write_text(json.dumps({"header": header, "rows": rows}, indent=1))
    print("| model | batch | cached tokens/s | recompute tokens/s | speed-up | same greedy tokens |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['batch']} | {r['cached_tok_s']:.0f} | {r['recompute_tok_s']:.0f} | "
              f"{r['speedup']:.1f}x | {r['same_greedy_tokens']} |")


if __name__ == "__main__":
    main()
