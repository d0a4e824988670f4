"""The dense Llama baseline and the shared layers (RoPE, RMSNorm, SwiGLU, attention backends)."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F

from hydra_titan.models.common import (
    ATTENTION_BACKENDS, RMSNorm, SwiGLU, apply_rope, get_attention_backend, rope_cache, sdpa_attention,
    swiglu_hidden_dim,
)
from hydra_titan.models.llama import LlamaModel, LlamaModelArgs
from hydra_titan.models.common.gqa import GQAttention


def tiny_args(**kw) -> LlamaModelArgs:
    base = dict(vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, multiple_of=32,
                max_seq_len=64)
    base.update(kw)
    return LlamaModelArgs(**base)


def tiny_model(**kw) -> LlamaModel:
    model = LlamaModel(tiny_args(**kw))
    model.init_weights()
    return model


def reference_rope(x: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Complex-number RoPE in the rotate-half layout: pair (x_i, x_{i+D/2}) as x_i + j*x_{i+D/2},
    multiplied by exp(j * pos * theta^(-2i/D)). x [B, T, H, D], positions [B, T]."""
    d = x.shape[-1]
    half = d // 2
    freqs = theta ** (-torch.arange(half, dtype=torch.float64) * 2 / d)
    angles = positions.to(torch.float64)[..., None] * freqs            # [B, T, D/2]
    rot = torch.polar(torch.ones_like(angles), angles)[:, :, None, :]   # [B, T, 1, D/2]
    z = torch.complex(x[..., :half].double(), x[..., half:].double()) * rot
    return torch.cat([z.real, z.imag], dim=-1).to(x.dtype)


def reference_causal_gqa(q, k, v, scale):
    """q [B, T, Hq, D], k/v [B, T, Hkv, D]; query head j reads KV head j // (Hq/Hkv)."""
    group = q.shape[2] // k.shape[2]
    k = k.repeat_interleave(group, dim=2)
    v = v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, k) * scale
    t = q.shape[1]
    mask = torch.ones(t, t, dtype=torch.bool).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v)


# ----------------------------------------------------------------------------- model outputs

def test_output_mapping():
    model = tiny_model()
    tokens = torch.randint(0, 96, (3, 20))
    out = model(tokens)
    assert {"logits", "aux_loss", "ponder_loss"} <= set(out)
    assert out["logits"].shape == (3, 20, 96)
    assert torch.isfinite(out["logits"]).all()
    for key in ("aux_loss", "ponder_loss"):
        assert out[key].dim() == 0 and out[key].item() == 0.0


def test_causality():
    model = tiny_model().eval()
    tokens = torch.randint(0, 96, (2, 24))
    t = 13
    changed = tokens.clone()
    changed[:, t] = (changed[:, t] + 7) % 96
    with torch.no_grad():
        a, b = model(tokens)["logits"], model(changed)["logits"]
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=1e-6)
    assert (a[:, t] - b[:, t]).abs().max() > 1e-3
    assert (a[:, t + 1:] - b[:, t + 1:]).abs().max() > 1e-3


def test_explicit_positions_equal_default():
    model = tiny_model()
    tokens = torch.randint(0, 96, (2, 16))
    positions = torch.arange(16).expand(2, 16)
    torch.testing.assert_close(model(tokens)["logits"], model(tokens, positions)["logits"], rtol=0, atol=0)


# ----------------------------------------------------------------------------- attention

@pytest.mark.parametrize("hq,hkv", [(4, 1), (4, 2), (6, 3), (4, 4)])
def test_sdpa_attention_matches_reference(hq, hkv):
    q = torch.randn(2, 11, hq, 16)
    k = torch.randn(2, 11, hkv, 16)
    v = torch.randn(2, 11, hkv, 16)
    torch.testing.assert_close(sdpa_attention(q, k, v), reference_causal_gqa(q, k, v, 16 ** -0.5),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sdpa_attention(q, k, v, scale=0.3), reference_causal_gqa(q, k, v, 0.3),
                               rtol=1e-5, atol=1e-5)


def test_gqa_module_matches_reference():
    args = tiny_args(n_heads=6, n_kv_heads=2)
    model = LlamaModel(args)
    model.init_weights()
    attn: GQAttention = model.layers["0"].attention
    bsz, t = 2, 19
    x = torch.randn(bsz, t, args.dim)
    positions = torch.arange(t).expand(bsz, t)
    q, k, v = (x @ attn.wqkv.weight.T).split([attn.q_dim, attn.kv_dim, attn.kv_dim], dim=-1)
    q = reference_rope(q.view(bsz, t, 6, 16), positions)
    k = reference_rope(k.view(bsz, t, 2, 16), positions)
    out = reference_causal_gqa(q, k, v.view(bsz, t, 2, 16), 16 ** -0.5).reshape(bsz, t, 96)
    expected = out @ attn.wo.weight.T
    torch.testing.assert_close(attn(x, positions, model.rope_cache), expected, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- RoPE

def test_apply_rope_matches_complex_reference():
    cache = rope_cache(32, 128, theta=10000.0)
    x = torch.randn(2, 10, 3, 32)
    positions = torch.randint(0, 128, (2, 10))
    torch.testing.assert_close(apply_rope(x, cache, positions), reference_rope(x, positions), rtol=1e-5, atol=1e-5)
    # a 1-D positions vector broadcasts over the batch
    pos1 = torch.arange(10) * 3
    torch.testing.assert_close(apply_rope(x, cache, pos1), reference_rope(x, pos1.expand(2, 10)),
                               rtol=1e-5, atol=1e-5)
    # position 0 is the identity
    torch.testing.assert_close(apply_rope(x, cache, torch.zeros(10, dtype=torch.long)), x, rtol=0, atol=0)


def test_rope_theta_changes_angles():
    x = torch.randn(1, 4, 1, 16)
    pos = torch.tensor([[1, 5, 9, 30]])
    torch.testing.assert_close(apply_rope(x, rope_cache(16, 64, theta=500.0), pos),
                               reference_rope(x, pos, theta=500.0), rtol=1e-5, atol=1e-5)


def test_rope_preserves_norms():
    cache = rope_cache(64, 256)
    x = torch.randn(3, 17, 4, 64)
    positions = torch.randint(0, 256, (3, 17))
    torch.testing.assert_close(apply_rope(x, cache, positions).norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-5)


def test_rope_relative_position():
    cache = rope_cache(32, 512)
    q = torch.randn(1, 1, 1, 32)
    k = torch.randn(1, 1, 1, 32)

    def score(m, n):
        qr = apply_rope(q, cache, torch.tensor([[m]]))
        kr = apply_rope(k, cache, torch.tensor([[n]]))
        return (qr * kr).sum().item()

    for shift in (1, 17, 300):
        assert score(10 + shift, 3 + shift) == pytest.approx(score(10, 3), rel=1e-4, abs=1e-4)
    # and it does depend on the difference
    assert abs(score(10, 3) - score(10, 4)) > 1e-3


def test_rope_cache_rejects_odd_head_dim():
    with pytest.raises(ValueError, match="head_dim"):
        rope_cache(15, 8)


# ----------------------------------------------------------------------------- norms and FFN

def test_rmsnorm_matches_formula():
    norm = RMSNorm(24, eps=1e-5)
    norm.reset_parameters()
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 24))
    x = torch.randn(4, 7, 24) * 3 + 1
    expected = x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), expected, rtol=1e-5, atol=1e-6)
    # bf16 input keeps its dtype
    assert norm.to(torch.bfloat16)(x.bfloat16()).dtype == torch.bfloat16


def test_swiglu_matches_formula():
    ffn = SwiGLU(16, 40)
    ffn.init_weights(0.1, 0.1)
    x = torch.randn(3, 5, 16)
    a = x @ ffn.w1.weight.T
    expected = ((a * torch.sigmoid(a)) * (x @ ffn.w3.weight.T)) @ ffn.w2.weight.T
    torch.testing.assert_close(ffn(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dim,mult,multiple_of,expected", [
    (2048, 1.0, 256, 5632), (4096, 1.0, 256, 11008), (512, 1.0, 256, 1536), (768, 1.0, 256, 2048),
    (4096, 1.3, 1024, 14336), (64, 1.0, 32, 192),
])
def test_swiglu_hidden_dim(dim, mult, multiple_of, expected):
    assert swiglu_hidden_dim(dim, mult, multiple_of) == expected


# ----------------------------------------------------------------------------- argument checks

def test_bad_args_name_the_argument():
    with pytest.raises(ValueError, match="n_kv_heads"):
        tiny_args(n_heads=6, n_kv_heads=4)
    with pytest.raises(ValueError, match="head_dim"):
        tiny_args(head_dim=15)
    with pytest.raises(ValueError, match="n_layers"):
        tiny_args(n_layers=0)


def test_unknown_attn_backend_lists_backends():
    with pytest.raises(ValueError, match="nope") as e:
        LlamaModel(tiny_args(attn_backend="nope"))
    for name in ATTENTION_BACKENDS:
        assert name in str(e.value)
    assert set(ATTENTION_BACKENDS) >= {"sdpa", "flash_attn"}
    with pytest.raises(ValueError, match="sdpa"):
        get_attention_backend("xformers")


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed")
def test_flash_attn_backend_without_package():
    with pytest.raises(ImportError, match="flash-attn"):
        LlamaModel(tiny_args(attn_backend="flash_attn"))


def test_loss_decreases_with_a_few_steps():
    """A smoke check that gradients reach every parameter and point downhill."""
    model = tiny_model()
    tokens = torch.randint(0, 96, (4, 32))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        logits = model(tokens[:, :-1])["logits"]
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        if not losses:
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(96), rel=0.2)
    assert losses[-1] < losses[0] - 0.3
