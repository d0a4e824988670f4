#!/usr/bin/env python
"""Profile the recorded decode step and say where a token's time goes, by category (CUDA only).

Builds the model as decode_benchmark.py does (random weights, --dtype), prefills a random prompt of
--prompt-len tokens per row into a cache of prompt + --max-new tokens (the benchmark's attention
length), records the one-token step as a CUDA graph (`CapturedDecodeStep`, blocks compiled unless
--no-compile), replays it a few times, then profiles --replays replays and prints device time and
kernels per token by category (profile_step.py's categories) and the top kernels.

    python scripts/profile_decode.py --case hydra:1B --batch 1 [--no-compile] [--replays 50]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode_benchmark import build  # noqa: E402
from profile_step import categorise, device_kernels, time_by_category_and_name  # noqa: E402

from hydra_titan.components.generation import CapturedDecodeStep  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", default="hydra:1B")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--max-new", type=int, default=512, help="cache length = prompt + this")
    parser.add_argument("--replays", type=int, default=50)
    parser.add_argument("--no-compile", action="store_true", help="record the eager step, not the compiled one")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--json", default="")
    opts = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("profile_decode.py profiles a CUDA-graph replay: it needs a CUDA device")
    if opts.replays + 8 > opts.max_new:
        parser.error(f"--max-new ({opts.max_new}) must leave room for --replays + 8 tokens")
    device, dtype = torch.device("cuda"), getattr(torch, opts.dtype)
    model = build(opts.case, device, dtype, opts.prompt_len + opts.max_new)
    cache = model.init_cache(opts.batch, opts.prompt_len + opts.max_new, device)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.args.vocab_size, (opts.batch, opts.prompt_len), generator=gen).to(device)
    with torch.no_grad():
        logits = model(prompt, cache=cache)["logits"][:, -1]
        step = CapturedDecodeStep(model, cache, logits.argmax(-1)[:, None], compile=not opts.no_compile)
        logits = step.first
        for _ in range(5):
            logits = step(logits.argmax(-1)[:, None])
        # profile the step alone: feed one fixed token (the greedy argmax would add kernels per token)
        token = logits.argmax(-1)[:, None]
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            start = time.perf_counter()
            for _ in range(opts.replays):
                step(token)
            torch.cuda.synchronize()
            wall_ms = (time.perf_counter() - start) * 1e3 / opts.replays

    kernels = device_kernels(prof.events())
    by_cat, by_name = time_by_category_and_name(kernels)
    n = opts.replays
    total_ms = sum(v[0] for v in by_cat.values()) / 1e3 / n
    mode = "eager step" if opts.no_compile else "compiled step"
    print(f"{opts.case} batch {opts.batch}, {mode} replayed, {opts.dtype}, {torch.cuda.get_device_name()}, torch "
          f"{torch.__version__}: wall {wall_ms:.2f} ms per token, device {total_ms:.2f} ms (sum of kernel times), "
          f"{len(kernels) / n:.0f} kernels per token")
    print("| category | ms/token | kernels/token | share |\n|---|---|---|---|")
    for cat, (us, count) in sorted(by_cat.items(), key=lambda kv: -kv[1][0]):
        print(f"| {cat} | {us / 1e3 / n:.3f} | {count / n:.0f} | {100 * us / 1e3 / n / total_ms:.1f} % |")
    print(f"\ntop {opts.top} kernels (ms/token, kernels/token, category):")
    for name, (us, count) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[: opts.top]:
        print(f"  {us / 1e3 / n:7.3f}  {count / n:5.0f}  {categorise(name):>26}  {name[:100]}")
    if opts.json:
        Path(opts.json).write_text(json.dumps({
            "case": opts.case, "batch": opts.batch, "compiled": not opts.no_compile, "wall_ms": wall_ms,
            "device_ms": total_ms, "kernels_per_token": len(kernels) / n,
            "categories": {k: {"ms": v[0] / 1e3 / n, "kernels": v[1] / n} for k, v in by_cat.items()}}, indent=1))


if __name__ == "__main__":
    main()
