"""Top-k selection of a routing step (kernels/topk_route.py): the torch path, the dispatch, and the
Triton kernel's logic under Triton's CPU interpreter (the kernel itself runs on the H200:
tests/gpu/test_topk_route_cuda.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from hydra_titan.kernels.topk_route import get_topk_route, topk_route_torch, topk_route_triton
from hydra_titan.models.hybrid import HybridModelArgs
from hydra_titan.models.hydra.args import HydraModelArgs

REPO = Path(__file__).resolve().parents[2]


def test_the_torch_path_keeps_the_k_highest_in_position_order_with_their_target():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.8, 0.0], [3.0, -1.0, 2.0, -2.0, 1.0]])
    idx, target = topk_route_torch(scores, 3)
    assert idx.tolist() == [[1, 2, 3], [0, 2, 4]]
    assert target.tolist() == [[0, 1, 1, 1, 0], [1, 0, 1, 0, 1]]
    source = torch.tensor([[10, 11, 12, 13, 14], [20, 21, 22, 23, 24]])
    assert topk_route_torch(scores, 2, source)[0].tolist() == [[11, 13], [20, 22]]


def test_the_triton_choice_takes_the_torch_path_for_cpu_tensors():
    scores = torch.randn(4, 37, generator=torch.Generator().manual_seed(0))
    for got, want in zip(topk_route_triton(scores, 9), topk_route_torch(scores, 9)):
        assert torch.equal(got, want)


def test_an_unknown_routing_kernel_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match=r"unknown routing_kernel 'cuda'.*'torch', 'triton'"):
        get_topk_route("cuda")
    with pytest.raises(ValueError, match="routing_kernel must be one of"):
        HydraModelArgs(routing_kernel="cuda")
    with pytest.raises(ValueError, match="unknown routing_kernel"):
        HybridModelArgs(variant="v2", routing_kernel="cuda")


_INTERPRETED = textwrap.dedent("""
    import torch
    from hydra_titan.kernels import topk_route_triton as kernel
    from hydra_titan.kernels.topk_route import topk_route_torch

    gen = torch.Generator().manual_seed(0)
    for b, m, k in [(3, 17, 6), (2, 2048, 1536), (4, 100, 1), (2, 64, 64), (1, 4096, 1024)]:
        scores = torch.randn(b, m, generator=gen)
        source = torch.randperm(b * m, generator=gen).view(b, m)
        for src in (None, source):
            for got, want in zip(kernel.topk_route(scores, k, src), topk_route_torch(scores, k, src)):
                assert torch.equal(got, want), (b, m, k, src is None)
    # ties keep the earliest positions; negative scores and -inf order as floats
    idx, target = kernel.topk_route(torch.tensor([[1.0, 2.0, 2.0, 2.0, -1.0, -3.0, 2.0, 0.0]]), 3, None)
    assert idx.tolist() == [[1, 2, 3]] and target.tolist() == [[0, 1, 1, 1, 0, 0, 0, 0]], (idx, target)
    idx, _ = kernel.topk_route(torch.tensor([[-1.0, -2.0, -2.0, float("-inf"), -1.5]]), 4, None)
    assert idx.tolist() == [[0, 1, 2, 4]], idx
    print("interpreted kernel ok")
""")


def test_the_triton_kernel_matches_the_torch_path_under_the_interpreter():
    """The kernel's logic (bit-by-bit k-th key, tie rule, compaction) on CPU through TRITON_INTERPRET=1,
    in a child process: the interpreter is chosen when Triton decorates the kernel."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", _INTERPRETED], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "interpreted kernel ok" in proc.stdout
