"""The SSD scan and the Mamba-2 mixer on CPU: the chunked PyTorch form against the recurrence, causality."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hydra_titan.kernels.ssd import resolve_ssd_backend, ssd_chunked_torch, ssd_sequential
from hydra_titan.models.common.ssm import Mamba2Mixer, SSMConfig, causal_conv1d


def scan_inputs(b, t, g, h, n, p, dtype=torch.float64):
    q, k = torch.randn(b, t, g, n, dtype=dtype), torch.randn(b, t, g, n, dtype=dtype)
    v = torch.randn(b, t, h, p, dtype=dtype)
    dt = F.softplus(torch.randn(b, t, h, dtype=dtype))       # random dt > 0
    a = -torch.rand(h, dtype=dtype) * 2 - 0.05                # random A < 0
    return [x.requires_grad_() for x in (q, k, v, dt * a)]


@pytest.mark.parametrize("seq_len,chunk", [(64, 16), (128, 32), (100, 16), (7, 16), (33, 32)])
@pytest.mark.parametrize("groups,heads", [(1, 3), (2, 4), (4, 4)])
def test_chunked_ssd_equals_the_sequential_recurrence_in_float64(seq_len, chunk, groups, heads):
    x = scan_inputs(2, seq_len, groups, heads, n=8, p=6)
    grad = torch.randn(2, seq_len, heads, 6, dtype=torch.float64)
    want = ssd_sequential(*x)
    got = ssd_chunked_torch(*x, chunk_size=chunk)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    for a, b in zip(torch.autograd.grad(got, x, grad), torch.autograd.grad(want, x, grad)):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


def test_chunked_ssd_returns_bf16_for_bf16_values_computed_in_fp32():
    """A bf16 model's mixer feeds the scan's output to bf16 weights: it must come back in v's dtype."""
    x = [t.detach() for t in scan_inputs(1, 40, 2, 4, n=8, p=6)]
    q, k, v = (t.to(torch.bfloat16) for t in x[:3])
    g = x[3].float()  # g stays fp32, as the mixer passes it
    got = ssd_chunked_torch(q, k, v, g, chunk_size=16)
    assert got.dtype == torch.bfloat16
    want = ssd_sequential(q.double(), k.double(), v.double(), g.double())
    torch.testing.assert_close(got.double(), want, atol=3e-2, rtol=3e-2)


def test_causal_conv_equals_a_left_padded_depthwise_conv1d():
    x, w, bias = torch.randn(2, 20, 6), torch.randn(6, 4), torch.randn(6)
    want = F.conv1d(F.pad(x.transpose(1, 2), (3, 0)), w.unsqueeze(1), bias, groups=6).transpose(1, 2)
    torch.testing.assert_close(causal_conv1d(x, w, bias), want)


def mixer(**kw) -> Mamba2Mixer:
    m = Mamba2Mixer(64, SSMConfig(head_dim=16, state_dim=16, groups=2, chunk_size=16, **kw))
    m.init_weights(0.02, 0.02)
    return m


def test_the_mixer_is_causal():
    m = mixer()
    x = torch.randn(2, 50, 64)
    changed = x.clone()
    changed[:, 30] += 1.0
    with torch.no_grad():
        a, b = m(x), m(changed)
    assert torch.equal(a[:, :30], b[:, :30])  # nothing before position 30 moved, bitwise
    assert (a[:, 30:] - b[:, 30:]).abs().max() > 1e-3


def test_mamba2_initialisation_ranges():
    m = mixer()
    dt = F.softplus(m.dt_bias)
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 1e-1 * 1.001
    a = -torch.exp(m.A_log)
    assert a.min() >= -16 and a.max() <= -1
    assert torch.equal(m.D, torch.ones_like(m.D))


def test_backend_choice_and_errors_name_the_key():
    name, _ = resolve_ssd_backend("auto", head_dim=64, state_dim=128, chunk_size=64, device_type="cpu")
    assert name == "torch"  # no GPU here: the PyTorch chunked form
    with pytest.raises(ValueError, match="ssm_state_dim=32"):
        resolve_ssd_backend("triton", head_dim=64, state_dim=32, chunk_size=64)
    with pytest.raises(ValueError, match="ssm_head_dim=48"):
        SSMConfig(head_dim=48, state_dim=128, backend="triton").check(dim=96)
    with pytest.raises(ValueError, match="ssm_backend"):
        SSMConfig(backend="cuda").check(dim=64)
    with pytest.raises(ValueError, match="ssm_head_dim"):
        SSMConfig(head_dim=48).check(dim=64)  # 48 does not divide expand*dim = 128
