#!/usr/bin/env python
"""Decode speed: cached generation (eager, replayed as a CUDA graph, compiled and replayed) against
recomputing the whole sequence each step.

For each model and batch: a random prompt of --prompt-len tokens per row, then --new-tokens greedy
tokens, timed end to end (prefill included), in each of --modes:
  graph           the cached decode step recorded once as a CUDA graph and replayed (CUDA only)
  graph-compiled  the same, with the step's blocks compiled by torch.compile (inductor) before the
                  recording: fused elementwise kernels (CUDA only). Its warm-up run decodes as many
                  tokens as the timed one, so that it compiles for the same cache shape and the
                  timed run compiles nothing; `graph-compiled_warmup_s` is that run (compile included)
  cached          the cached decode step dispatched eagerly
  recompute       the whole sequence recomputed at every step (the baseline of the speed-up)
Random weights: the speed of a step does not depend on what was learned, but a routed model's
threshold routing does decide how many tokens a prefill keeps (~50 % untrained).

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


MODES = {  # name -> generate() keywords
    "graph": {"use_cache": True, "cuda_graph": True},
    "graph-compiled": {"use_cache": True, "cuda_graph": True, "compile_step": True},
    "cached": {"use_cache": True},
    "recompute": {"use_cache": False},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["hydra:1B", "llama:1B"])
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=None,
                        help="default: graph graph-compiled cached recompute on CUDA, cached recompute on CPU")
    parser.add_argument("--slow-tokens", type=int, default=0,
                        help="time the eager modes (cached, recompute) over this many new tokens (0: all); fewer "
                             "make their tokens/s an overestimate, so the speed-ups over them lower bounds")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default="decode_benchmark.json")
    opts = parser.parse_args()
    device, dtype = torch.device(opts.device), getattr(torch, opts.dtype)
    replayed = ("graph", "graph-compiled")  # the CUDA-graph modes, timed over all --new-tokens
    modes = opts.modes or ([*replayed, "cached", "recompute"] if device.type == "cuda" else ["cached", "recompute"])
    for mode in (m for m in modes if m in replayed):
        if device.type != "cuda":
            parser.error(f"--modes {mode} needs a CUDA device")
    header = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
              "dtype": opts.dtype, "prompt_len": opts.prompt_len, "new_tokens": opts.new_tokens,
              "slow_tokens": opts.slow_tokens or opts.new_tokens}
    print(json.dumps(header), flush=True)
    rows = []
    for case in opts.cases:
        model = build(case, device, dtype, opts.prompt_len + opts.new_tokens)
        vocab = model.args.vocab_size
        for batch in opts.batch:
            gen = torch.Generator().manual_seed(batch)
            prompts = torch.randint(0, vocab, (batch, opts.prompt_len), generator=gen).tolist()
            row: dict = {"case": case, "batch": batch}
            tokens: dict[str, list] = {}
            for mode in modes:
                n_new = opts.new_tokens if mode in replayed else (opts.slow_tokens or opts.new_tokens)
                # warm-up: kernels, allocator; the compiled step compiles for one cache length (prompt + new)
                warm_new = n_new if mode == "graph-compiled" else 4
                warm_s = timed(lambda: generate(model, prompts, warm_new, temperature=0, **MODES[mode]))
                if mode == "graph-compiled":
                    row[f"{mode}_warmup_s"] = warm_s
                row[f"{mode}_s"] = timed(lambda: tokens.setdefault(mode, generate(
                    model, prompts, n_new, temperature=0, **MODES[mode])))
                row[f"{mode}_tok_s"] = batch * n_new / row[f"{mode}_s"]
            if "recompute" in modes:
                for mode in set(modes) - {"recompute"}:
                    row[f"{mode}_speedup"] = row[f"{mode}_tok_s"] / row["recompute_tok_s"]
            # greedy tokens of every mode over the tokens they share (bf16 may break near-ties differently)
            shared = min(len(t[0]) for t in tokens.values())
            first = next(iter(tokens.values()))
            row["same_greedy_tokens"] = all(a[:shared] == b[:shared] for t in tokens.values() for a, b in zip(first, t))
            rows.append(row)
            print(json.dumps(row), flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    fastest = next(m for m in ("graph-compiled", "graph", "cached") if m in modes)
    by = {(r["case"], r["batch"]): r for r in rows}
    for (case, batch), r in by.items():
        baseline = by.get((f"llama:{case.split(':')[1]}", batch))
        if baseline is not None and r is not baseline:
            ratio = r[f"{fastest}_tok_s"] / baseline[f"{fastest}_tok_s"]
            print(f"batch {batch}: {case} / llama {fastest} tokens/s = {ratio:.2f}")
    Path(opts.json).write_text(json.dumps({"header": header, "rows": rows}, indent=1))
    cols = [f"{m} tokens/s" for m in modes] + [f"{m} / recompute" for m in modes if m != "recompute" and "recompute" in modes]
    print("| model | batch | " + " | ".join(cols) + " | same greedy tokens |")
    print("|---|---|" + "---|" * len(cols) + "---|")
    for r in rows:
        cells = [f"{r[f'{m}_tok_s']:.1f}" for m in modes]
        cells += [f"{r[f'{m}_speedup']:.1f}x" for m in modes if f"{m}_speedup" in r]
        print(f"| {r['case']} | {r['batch']} | " + " | ".join(cells) + f" | {r['same_greedy_tokens']} |")


if __name__ == "__main__":
    main()
