#!/usr/bin/env python
"""Profile training steps and say where the time goes, by category.

Builds the model exactly as the trainer does (see benchmark.py), warms up
(compile happens there), then records a few steps with torch.profiler and
prints (1) device time per category — GEMMs, attention, routing
gathers/scatters, top-k/sort, fused elementwise (Triton), norms, optimizer,
communication, copies — and (2) the top kernels. Optionally writes a Chrome
trace.

    python scripts/profile_step.py --case hydra:1B --steps 3 [--trace trace.json] [-- trainer overrides]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchmark import override_argv, parse_case, trainer_argv  # noqa: E402

from hydra_titan.config import load_config  # noqa: E402
from hydra_titan.distributed.utils import shutdown_and_exit  # noqa: E402
from hydra_titan.train import Trainer  # noqa: E402

# first match wins: (category, regex over the kernel / op name)
CATEGORIES = [
    ("communication", r"nccl|all_gather|reduce_scatter|all_reduce|c10d"),
    ("attention", r"flash|fmha|cudnn.*attn|attention|sdpa|efficient_attention"),
    # inductor names a kernel after every op it fused: a float8 cast feeding _scaled_mm is not a GEMM
    ("float8 amax / scale / cast (triton)", r"^triton_.*(abs_.*max|amax|reciprocal|_scaled_mm)"),
    ("gemm", r"gemm|sm90_xmma|cutlass|matmul|mm_|_mm|wgmma|bmm|addmm|scaled_mm|nvjet|aten::mm\b"),
    ("topk/sort", r"topk|sort|radix|bitonic|segmented"),
    ("fused reductions (triton)", r"^triton_(red|per)_"),
    ("fused elementwise (triton)", r"^triton_|triton"),
    ("gather/scatter", r"gather|scatter|index|take_along|put_"),
    ("optimizer", r"adam|foreach|multi_tensor|_fused_adam"),
    ("copy/cast", r"copy|cast|convert|to_copy|memcpy|memset|fill"),
    ("norm", r"norm"),
    ("elementwise (eager)", r"elementwise|vectorized|unrolled|reduce_kernel"),
]


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def categorise(name: str) -> str:
    low = name.lower()
    for cat, pattern in CATEGORIES:
        if re.search(pattern, low):
            return cat
    return "other"


def device_kernels(events, on_gpu: bool = True) -> list:
    """The profiled kernels: device events on a GPU (aten ops on CPU), without user annotations
    (e.g. "Optimizer.step#AdamW.step"), which also appear on the device timeline."""
    return [e for e in events
            if (e.device_type == torch.autograd.DeviceType.CUDA) == on_gpu and (on_gpu or e.name.startswith("aten::"))
            and not getattr(e, "is_user_annotation", False) and "#" not in e.name]


def time_by_category_and_name(kernels, on_gpu: bool = True) -> tuple[dict, dict]:
    """Two tables {category: [µs, count]} and {kernel name: [µs, count]} over `kernels` (device time
    on a GPU, self CPU time on CPU)."""
    by_cat: dict[str, list] = defaultdict(lambda: [0.0, 0])
    by_name: dict[str, list] = defaultdict(lambda: [0.0, 0])
    for e in kernels:
        us = e.device_time_total if on_gpu else e.self_cpu_time_total
        for table, key in ((by_cat, categorise(e.name)), (by_name, e.name)):
            table[key][0] += us
            table[key][1] += 1
    return dict(by_cat), dict(by_name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", default="hydra:1B", help="model:flavor[:key=value,...] as in benchmark.py")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--ac", default="selective")
    parser.add_argument("--compile", default="on", choices=["on", "off"])
    parser.add_argument("--vocab-size", type=int, default=100_352)
    parser.add_argument("--trace", default="", help="write a Chrome trace here")
    parser.add_argument("--json", default="", help="write the category summary here")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("extra", nargs=argparse.REMAINDER)
    opts = parser.parse_args()
    extra = [a for a in opts.extra if a != "--"]

    model, flavor, overrides = parse_case(opts.case)
    cfg = load_config(trainer_argv(model, flavor, seq_len=opts.seq_len, batch=opts.batch, steps=1000, ac=opts.ac,
                                   compile_=opts.compile == "on", vocab_size=opts.vocab_size,
                                   dump_folder="/tmp/hydra_titan_profile") + override_argv(overrides) + extra)
    trainer = Trainer(cfg)
    tokens = torch.randint(0, trainer.model_args.vocab_size, (opts.batch, opts.seq_len + 1))
    batch = [(tokens[:, :-1], tokens[:, 1:])]
    for _ in range(opts.warmup):
        trainer.train_step(batch)
    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(opts.steps):
            trainer.train_step(batch)
        sync()
        wall_ms = (time.perf_counter() - start) * 1e3 / opts.steps
    if opts.trace:
        prof.export_chrome_trace(opts.trace)

    on_gpu = torch.cuda.is_available()
    kernels = device_kernels(prof.events(), on_gpu)
    by_cat, by_name = time_by_category_and_name(kernels, on_gpu)
    by_cat = {k: us for k, (us, _) in by_cat.items()}
    by_name = {k: us for k, (us, _) in by_name.items()}
    total = sum(by_cat.values())
    step_ms = total / 1e3 / opts.steps
    print(f"{opts.case} {' '.join(extra)}: device time per step {step_ms:.1f} ms (sum of kernel times), "
          f"{len(kernels) / opts.steps:.0f} kernels per step, wall {wall_ms:.1f} ms per step")
    print("| category | ms/step | share |\n|---|---|---|")
    for cat, us in sorted(by_cat.items(), key=lambda kv: -kv[1]):
        print(f"| {cat} | {us / 1e3 / opts.steps:.2f} | {100 * us / total:.1f} % |")
    print(f"\ntop {opts.top} kernels (ms/step, category):")
    for name, us in sorted(by_name.items(), key=lambda kv: -kv[1])[: opts.top]:
        print(f"  {us / 1e3 / opts.steps:8.2f}  {categorise(name):>22}  {name[:110]}")
    print("\nhost (CPU) self time, top ops:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))
    if opts.json:
        Path(opts.json).write_text(json.dumps({"case": opts.case, "extra": extra, "step_ms": step_ms, "wall_ms": wall_ms,
                                               "kernels_per_step": len(kernels) / opts.steps,
                                               "categories": {k: v / 1e3 / opts.steps for k, v in by_cat.items()}},
                                              indent=2))
    shutdown_and_exit(0)


if __name__ == "__main__":
    main()
