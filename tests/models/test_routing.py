"""Routing primitives: distinct-index gather / scatter-add and the fused router score.

They replace autograd's scatter-add backward (atomics) and a width-1 GEMM; the
reference is the plain torch op, in value and in gradient, eager and compiled.
"""

import pytest
import torch

from hydra_titan.kernels.topk_route import topk_route_torch
from hydra_titan.models.common.routing import gather_tokens, router_logits, scatter_add_tokens


def _case(dtype, b=3, n=17, k=6, e=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, e, generator=gen).to(dtype)
    idx, _ = topk_route_torch(torch.randn(b, n, generator=gen), k)
    update = torch.randn(b, k, e, generator=gen).to(dtype)
    return x, idx, update


def _reference(x, idx, update):
    index = idx.unsqueeze(-1).expand(-1, -1, x.shape[-1])
    return x.gather(1, index), x.scatter_add(1, index, update)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_and_scatter_add_match_torch_ops_in_value_and_gradient(dtype):
    x, idx, update = _case(dtype)
    grads = []
    for fns in ((gather_tokens, scatter_add_tokens), None):
        xs, us = x.clone().requires_grad_(), update.clone().requires_grad_()
        if fns is None:
            g, s = _reference(xs, idx, us)
        else:
            g, s = fns[0](xs, idx), fns[1](xs, idx, us)
        w1 = torch.randn(g.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
        w2 = torch.randn(s.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
        ((g * w1).sum() + (s * w2).sum()).float().backward()
        grads.append((g.detach(), s.detach(), xs.grad, us.grad))
    for ours, ref in zip(*grads):
        torch.testing.assert_close(ours, ref, rtol=0, atol=0)  # one addition per element: bitwise


def test_gather_of_2d_and_integer_tensors():
    x = torch.arange(12.0).view(2, 6).requires_grad_()
    idx = torch.tensor([[0, 4], [1, 5]])
    out = gather_tokens(x, idx)
    assert out.tolist() == [[0.0, 4.0], [7.0, 11.0]]
    out.sum().backward()
    assert x.grad.tolist() == [[1, 0, 0, 0, 1, 0], [0, 1, 0, 0, 0, 1]]
    positions = torch.arange(6).expand(2, 6)
    assert gather_tokens(positions, idx).tolist() == [[0, 4], [1, 5]]


def test_router_logits_equal_a_width_one_linear():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 16, generator=gen, requires_grad=True)
    linear = torch.nn.Linear(16, 1, bias=False)
    ours = router_logits(x, linear.weight)
    ref = linear(x).squeeze(-1)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    gx, gw = torch.autograd.grad(ours.square().sum(), (x, linear.weight))
    rx, rw = torch.autograd.grad(ref.square().sum(), (x, linear.weight))
    torch.testing.assert_close(gx, rx, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, rw, rtol=1e-5, atol=1e-5)


def test_compiled_fullgraph_matches_eager():
    x, idx, update = _case(torch.float32, seed=3)

    def step(x, idx, update):
        return scatter_add_tokens(x, idx, gather_tokens(x, idx) * update).square().sum()

    outs = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        xs, us = x.clone().requires_grad_(), update.clone().requires_grad_()
        loss = fn(xs, idx, us)
        loss.backward()
        outs.append((loss.detach(), xs.grad, us.grad))
    for ours, ref in zip(*outs):
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
