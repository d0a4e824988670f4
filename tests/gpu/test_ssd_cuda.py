"""Our Triton SSD kernels against the PyTorch chunked reference, and a compiled hybrid layer in one graph.

Run on the device machine; skipped on CPU (conftest): Triton needs a GPU.
"""

from __future__ import annotations

import pytest
import torch

from hydra_titan.kernels.ssd import ssd_chunked_torch, ssd_triton
from hydra_titan.models.hybrid import HybridModelArgs, HybridModel

pytestmark = pytest.mark.gpu


def inputs(b, t, g, h, p, n, dtype):
    q = torch.randn(b, t, g, n, device="cuda") / n ** 0.5
    k = torch.randn(b, t, g, n, device="cuda") / n ** 0.5
    v = torch.randn(b, t, h, p, device="cuda")
    gate = -torch.nn.functional.softplus(torch.randn(b, t, h, device="cuda")) * 0.2
    return [x.to(dtype).requires_grad_() for x in (q, k, v)] + [gate.requires_grad_()]


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


SHAPES = [
    (2, 2048, 8, 8, 64, 128),    # one group per head
    (1, 1000, 1, 16, 64, 128),   # T not a multiple of the chunk; B/C shared by all heads
    (3, 333, 2, 8, 64, 64),      # grouped, odd T, N 64
    (1, 4096, 4, 32, 128, 64),   # P 128
]
# bf16 also at the largest tiles; fp32 there (full-precision dots on [128, 128] tiles) takes minutes to tune
CASES = ([(s, torch.bfloat16) for s in SHAPES + [(2, 130, 1, 4, 128, 128)]]
         + [(s, torch.float32) for s in SHAPES])


@pytest.mark.parametrize("shape,dtype", CASES)
def test_triton_forward_and_backward_match_the_reference(shape, dtype):
    b, t, g, h, p, n = shape
    x = inputs(b, t, g, h, p, n, dtype)
    grad = torch.randn(b, t, h, p, device="cuda")
    ref = ssd_chunked_torch(*[a.double() for a in x], chunk_size=64)
    ref_grads = torch.autograd.grad(ref, x, grad.double())
    out = ssd_triton(*x)
    grads = torch.autograd.grad(out, x, grad.to(dtype))
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-4  # bf16 products on tensor cores; fp32 in full precision
    assert out.dtype == dtype and out.shape == ref.shape
    assert rel(out, ref) < tol
    for name, a, r in zip("q k v g".split(), grads, ref_grads):
        assert a.shape == r.shape, name
        assert rel(a, r) < tol, (name, rel(a, r))


def test_a_compiled_hybrid_layer_with_the_triton_scan_has_no_graph_break():
    args = HybridModelArgs(vocab_size=512, dim=256, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=64,
                           ssm_head_dim=64, ssm_state_dim=64, ssm_backend="triton")
    model = HybridModel(args).cuda()
    model.init_weights("cuda")
    layer = model.layers["1"]  # the SSM layer of the alternating pattern
    assert layer.attention.backend == "triton"
    x = torch.randn(2, 256, 256, device="cuda", requires_grad=True)
    positions = torch.arange(256, device="cuda").expand(2, -1)
    compiled = torch.compile(layer, fullgraph=True)  # a graph break would raise here
    out, _ = compiled(x, positions, model.rope_cache)
    eager, _ = layer(x, positions, model.rope_cache)
    assert rel(out, eager) < 1e-4
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("variant", ["v1", "v2", "v3"])
def test_every_variant_is_causal_on_the_gpu_path(variant):
    args = HybridModelArgs(vocab_size=512, dim=256, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=64,
                           ssm_head_dim=64, ssm_state_dim=128, variant=variant, global_chunk=(32,))
    model = HybridModel(args).cuda()
    model.init_weights("cuda")
    tokens = torch.randint(0, 512, (2, 300), device="cuda")
    changed = tokens.clone()
    changed[:, 150] = (changed[:, 150] + 1) % 512
    with torch.no_grad():
        model.train()  # v2: top-k routing reads the whole sequence; only the scan must stay causal
        if variant != "v2":
            a, b = model(tokens)["logits"], model(changed)["logits"]
            assert (a[:, :150] - b[:, :150]).abs().max().item() < 1e-5
        model.eval()
        a, b = model(tokens)["logits"], model(changed)["logits"]
    assert (a[:, :150] - b[:, :150]).abs().max().item() < 1e-5
    assert (a[:, 150:] - b[:, 150:]).abs().max().item() > 1e-3


def test_a_compiled_bf16_training_forward_at_the_1b_layer_shape_is_causal():
    """The benchmark's path: bf16 weights, torch.compile, training mode, 64 SSM heads on one B/C group,
    2048 tokens (32 chunks). Token 1500 changed: logits before it must not move."""
    args = HybridModelArgs(vocab_size=1024, dim=2048, n_layers=2, n_heads=16, n_kv_heads=4, head_dim=128,
                           ssm_head_dim=64, ssm_state_dim=128, ssm_backend="triton")
    model = HybridModel(args).cuda()
    model.init_weights("cuda")
    model = torch.compile(model.to(torch.bfloat16))
    tokens = torch.randint(0, 1024, (2, 2048), device="cuda")
    changed = tokens.clone()
    changed[:, 1500] = (changed[:, 1500] + 1) % 1024
    with torch.no_grad():
        a, b = model(tokens)["logits"].float(), model(changed)["logits"].float()
    assert (a[:, :1500] - b[:, :1500]).abs().max().item() < 1e-3
    assert (a[:, 1500:] - b[:, 1500:]).abs().max().item() > 1e-2
