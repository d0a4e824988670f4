"""Time one routing step's top-k selection: torch ops (eager, inductor) against the Triton kernel.

    python scripts/routing_benchmark.py [--shapes 16x2048x1536 ...] [--json FILE]

Each figure is the median of 200 CUDA-graph replays of 20 selections (launch cost out, as in a
captured training step), in microseconds per selection; the shapes are hydra's routing steps at
seq 2048 (MoD 0.75; MoR's steps over the active tokens).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from ssd_benchmark import time_ms  # noqa: E402

from hydra_titan.kernels.topk_route import topk_route_torch, topk_route_triton  # noqa: E402

DEFAULT_SHAPES = ["16x2048x1536", "16x1536x1024", "16x1024x512", "8x2048x1536", "8x1536x1024", "8x1024x512"]


def time_us(fn, scores: torch.Tensor, k: int, reps: int = 20, rounds: int = 200) -> float:
    """Median µs of one selection: `reps` selections recorded as one CUDA graph, replayed `rounds` times."""
    for _ in range(3):
        fn(scores, k)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn(scores, k)
    return time_ms(graph.replay, iters=rounds) * 1000 / reps


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="rows x scores x k")
    p.add_argument("--json", type=Path)
    opts = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    compiled_torch = torch.compile(topk_route_torch, fullgraph=True, dynamic=False)
    fns = {"torch eager": topk_route_torch, "torch compiled": compiled_torch, "triton": topk_route_triton}
    rows = []
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| rows x scores, k | " + " | ".join(f"{n} µs" for n in fns) + " | triton speed-up vs compiled |")
    print("|---|" + "---|" * (len(fns) + 1))
    for shape in opts.shapes:
        b, m, k = (int(v) for v in shape.split("x"))
        scores = torch.randn(b, m, device="cuda")
        row = {"shape": shape, **{n: time_us(fn, scores, k) for n, fn in fns.items()}}
        rows.append(row)
        print(f"| {b}x{m}, {k} | " + " | ".join(f"{row[n]:.1f}" for n in fns)
              + f" | {row['torch compiled'] / row['triton']:.2f}× |")
    if opts.json:
        opts.json.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                         "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
