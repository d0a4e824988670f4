#!/usr/bin/env python
"""Time the SSD scan (forward + backward) of every backend that runs here, and check it.

For each shape (default: the issue's 8192-token shapes, 32 heads, P 64, N 128, bf16) prints the
median fwd+bwd time of: our Triton kernels, the chunked PyTorch form under torch.compile, and
fla-core's forward (when installed; its backward refuses on triton < 3.7.1 Hopper), plus each
one's relative error against the fp32 PyTorch reference.

    python scripts/ssd_benchmark.py                        # B4 T2048 and B1 T8192
    python scripts/ssd_benchmark.py --shapes 1x32768x64x64x128 --groups 1
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hydra_titan.kernels.ssd import ssd_chunked_torch, ssd_triton  # noqa: E402


def make_inputs(b: int, t: int, h: int, p: int, n: int, groups: int, dtype: torch.dtype):
    g = groups or h
    q = torch.randn(b, t, g, n, device="cuda", dtype=dtype) / n ** 0.5
    k = torch.randn(b, t, g, n, device="cuda", dtype=dtype) / n ** 0.5
    v = torch.randn(b, t, h, p, device="cuda", dtype=dtype)
    gate = -torch.nn.functional.softplus(torch.randn(b, t, h, device="cuda")) * 0.1
    return [x.requires_grad_() for x in (q, k, v, gate)]


def time_ms(fn, iters: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def device_ms(fn, iters: int = 5) -> float:
    """Summed kernel time of one call, from the profiler: what the GPU spends, without the host's
    launch and dispatch time (which a training step hides by running ahead of the GPU)."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    return sum(e.self_device_time_total for e in prof.key_averages()) / iters / 1000


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def bench_shape(b, t, h, p, n, groups, dtype, chunk):
    inputs = make_inputs(b, t, h, p, n, groups, dtype)
    grad = torch.randn(b, t, h, p, device="cuda", dtype=dtype)
    ref_out = ssd_chunked_torch(*[x.float() for x in inputs], chunk_size=chunk)
    ref_grads = torch.autograd.grad(ref_out, inputs, grad.float())
    compiled = torch.compile(lambda *a: ssd_chunked_torch(*a, chunk_size=chunk))
    backends = {"triton": ssd_triton, "torch.compile": compiled}
    try:
        from fla.ops.simple_gla import chunk_simple_gla
        rep = h // (groups or h)

        def fla(q, k, v, g):
            return chunk_simple_gla(q.repeat_interleave(rep, 2), k.repeat_interleave(rep, 2), v, g, scale=1.0)[0]
        backends["fla (forward only)"] = fla
    except ImportError:
        pass
    rows = []
    for name, fn in backends.items():
        row = {"backend": name, "shape": f"B{b} T{t} H{h} P{p} N{n} G{groups or h}", "dtype": str(dtype)}
        try:
            out = fn(*inputs)
            row["err_out"] = rel(out, ref_out)
            if "forward only" in name:
                with torch.no_grad():
                    row["ms_fwd"] = time_ms(lambda: fn(*inputs))
            else:
                grads = torch.autograd.grad(out, inputs, grad)
                row["err_grads"] = max(rel(a, r) for a, r in zip(grads, ref_grads))
                with torch.no_grad():
                    row["ms_fwd"] = time_ms(lambda: fn(*inputs))
                row["ms_fwd_bwd"] = time_ms(lambda: torch.autograd.grad(fn(*inputs), inputs, grad))
                row["ms_fwd_bwd_device"] = device_ms(lambda: torch.autograd.grad(fn(*inputs), inputs, grad))
        except Exception as e:  # noqa: BLE001  (a backend that cannot run here is reported, not fatal)
            row["error"] = f"{type(e).__name__}: {str(e)[:160]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def profile_triton(b, t, h, p, n, groups, dtype, iters: int = 5) -> None:
    """Device time per kernel of the Triton fwd+bwd (which kernel to work on next)."""
    from torch.profiler import ProfilerActivity, profile
    inputs = make_inputs(b, t, h, p, n, groups, dtype)
    grad = torch.randn(b, t, h, p, device="cuda", dtype=dtype)
    for _ in range(2):
        torch.autograd.grad(ssd_triton(*inputs), inputs, grad)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            torch.autograd.grad(ssd_triton(*inputs), inputs, grad)
        torch.cuda.synchronize()
    print(f"# per-kernel device time, B{b} T{t} H{h} P{p} N{n}, mean of {iters} fwd+bwd")
    for evt in sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:12]:
        print(f"#   {evt.device_time_total / iters / 1000:8.3f} ms  {evt.count // iters:3d}x  {evt.key[:90]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["4x2048x32x64x128", "1x8192x32x64x128"],
                        help="BxTxHxPxN")
    parser.add_argument("--groups", type=int, default=0, help="B/C groups (0: one per head)")
    parser.add_argument("--chunk", type=int, default=64, help="chunk of the PyTorch form")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--profile", action="store_true", help="print the Triton backend's kernel times")
    parser.add_argument("--json", default="ssd_benchmark.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    dtype = getattr(torch, args.dtype)
    print(f"# {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    rows = []
    for shape in args.shapes:
        b, t, h, p, n = (int(x) for x in shape.split("x"))
        rows += bench_shape(b, t, h, p, n, args.groups, dtype, args.chunk)
        if args.profile:
            profile_triton(b, t, h, p, n, args.groups, dtype)
    Path(args.json).write_text(json.dumps(rows, indent=1))
    print("| backend | shape | fwd ms | fwd+bwd ms | fwd+bwd ms, device (kernel sum) | rel err out | rel err grads |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['backend']} | {r['shape']} | {r.get('ms_fwd', float('nan')):.3f} | "
              f"{r.get('ms_fwd_bwd', float('nan')):.3f} | {r.get('ms_fwd_bwd_device', float('nan')):.3f} | {r.get('err_out', float('nan')):.2e} | "
              f"{r.get('err_grads', float('nan')):.2e} | {r.get('error', '')}")


if __name__ == "__main__":
    main()
