"""The Triton top-k routing kernel against the torch path on the H200, alone, compiled, captured, and
inside a compiled hydra layer's forward and backward.

Run on the device machine; skipped on CPU (conftest): Triton needs a GPU. The kernel's logic is also
checked on CPU under Triton's interpreter (tests/models/test_topk_route.py)."""

from __future__ import annotations

import pytest
import torch

from hydra_titan.kernels.topk_route import topk_route_torch, topk_route_triton
from hydra_titan.models.hydra import HydraModel
from hydra_titan.models.hydra.args import HydraModelArgs

pytestmark = pytest.mark.gpu

# rows x scores, k: hydra 100M/1B routing steps at seq 2048 (MoD 0.75, MoR 0.75/0.5/0.25 of the
# active tokens), an odd length, a row longer than 4096, one token
SHAPES = [(16, 2048, 1536), (16, 1536, 1024), (8, 1024, 512), (3, 1000, 777), (2, 8192, 2048), (5, 300, 1)]


@pytest.mark.parametrize("b,m,k", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_kernel_equals_the_torch_path(b, m, k, dtype):
    gen = torch.Generator(device="cuda").manual_seed(m + k)
    scores = torch.randn(b, m, device="cuda", generator=gen).to(dtype)
    if dtype == torch.bfloat16:  # bf16 has ties: compare the kept values and the tie rule instead
        idx, target = topk_route_triton(scores, k)
        _, ref_target = topk_route_torch(scores, k)
        kept = scores.gather(1, idx).float().sort(dim=1).values
        ref_kept = scores.float().topk(k, dim=1).values.sort(dim=1).values
        assert torch.equal(kept, ref_kept)
        assert torch.equal(target.sum(1), ref_target.sum(1)) and bool((idx.diff(dim=1) > 0).all())
        return
    source = torch.randperm(b * m, device="cuda", generator=gen).view(b, m)
    for src in (None, source):
        for got, want in zip(topk_route_triton(scores, k, src), topk_route_torch(scores, k, src)):
            assert torch.equal(got, want)


def test_ties_keep_the_earliest_positions():
    scores = torch.tensor([[1.0, 2.0, 2.0, 2.0, -1.0, -3.0, 2.0, 0.0]], device="cuda")
    idx, target = topk_route_triton(scores, 3)
    assert idx.tolist() == [[1, 2, 3]] and target.tolist() == [[0, 1, 1, 1, 0, 0, 0, 0]]


def test_the_op_compiles_in_one_graph_and_replays_in_a_cuda_graph():
    scores = torch.randn(16, 2048, device="cuda")
    compiled = torch.compile(lambda s: topk_route_triton(s * 2.0, 1536), fullgraph=True)
    want = topk_route_torch(scores * 2.0, 1536)
    for got, ref in zip(compiled(scores), want):
        assert torch.equal(got, ref)
    static = scores.clone()
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        out = topk_route_triton(static, 1536)
    fresh = torch.randn(16, 2048, device="cuda")
    static.copy_(fresh)
    graph.replay()
    for got, ref in zip(out, topk_route_torch(fresh, 1536)):
        assert torch.equal(got, ref)


def test_a_compiled_hydra_layer_gives_the_torch_paths_loss_and_gradients():
    """MoD and MoR top-k through the kernel vs through torch ops: fp32, the same selection, so the
    forward and backward agree to fp32 rounding of the compiled kernels."""
    results = []
    for kernel in ("triton", "torch"):
        torch.manual_seed(0)
        args = HydraModelArgs(vocab_size=512, dim=256, n_mor_blocks=2, recursions=3, n_heads=4, n_kv_heads=2,
                              head_dim=64, mod_every=1, routing_kernel=kernel)
        model = HydraModel(args).cuda()
        model.init_weights("cuda")
        layer = torch.compile(model.layers["0"], fullgraph=True)
        x = torch.randn(4, 512, 256, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1),
                        requires_grad=True)
        positions = torch.arange(512, device="cuda").expand(4, -1)
        out, stats = layer(x, positions, model.rope_cache)
        loss = out.square().mean() + stats["mor_aux"] + stats["mod_aux"]
        loss.backward()
        grads = [p.grad for p in model.layers["0"].parameters()]
        results.append((loss.detach(), stats["mor_aux"].detach(), x.grad, grads))
    (l1, a1, x1, g1), (l2, a2, x2, g2) = results
    torch.testing.assert_close(l1, l2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(a1, a2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x1, x2, rtol=1e-5, atol=1e-6)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
