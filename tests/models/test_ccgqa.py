"""CCGQA attention, piece by piece, against reference formulas written out here (DESIGN §3.1)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hydra_titan.models.common.rope import rope_cache
from hydra_titan.models.hydra.args import HydraModelArgs
from hydra_titan.models.hydra.ccgqa import (CausalDepthwiseConv, CausalHeadConv, CCGQABlock, CCGQAAttention,
                                            causal_shift)


def small_args(**kw) -> HydraModelArgs:
    base = dict(vocab_size=64, dim=64, n_mor_blocks=1, recursions=1, n_heads=4, n_kv_heads=2, head_dim=8,
                max_seq_len=64)
    base.update(kw)
    return HydraModelArgs(**base)


def build_attention(**kw) -> CCGQAAttention:
    attn = CCGQAAttention(small_args(**kw))
    attn.init_weights(0.1, 0.1)
    with torch.no_grad():
        attn.log_beta.normal_(0, 0.3)  # a non-trivial temperature per KV head
    return attn


# ---------------------------------------------------------------- reference pieces
def ref_depthwise(u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """y[t, c] = sum_i w[c, i] * u[t - i, c], written as loops."""
    out = torch.zeros_like(u)
    for t in range(u.shape[1]):
        for i in range(w.shape[1]):
            if t - i >= 0:
                out[:, t] += w[:, i] * u[:, t - i]
    return out


def ref_head_conv(u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """u [B, T, H, D], w [H, k*D, D]: y[t, h] = sum_i u[t - i, h] @ w[h, i*D:(i+1)*D]."""
    d = u.shape[-1]
    out = torch.zeros_like(u)
    for t in range(u.shape[1]):
        for i in range(w.shape[1] // d):
            if t - i >= 0:
                out[:, t] += torch.einsum("bhc,hco->bho", u[:, t - i], w[:, i * d:(i + 1) * d])
    return out


def ref_rope(x: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Complex-number RoPE on pairs (j, j + D/2): x_j + i x_{j+D/2} times exp(i * pos * theta^(-2j/D))."""
    d = x.shape[-1]
    freqs = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = positions.double()[..., None] * freqs  # [B, T, D/2]
    z = torch.complex(x[..., : d // 2].double(), x[..., d // 2:].double()) * torch.polar(
        torch.ones_like(angles), angles)[:, :, None, :]
    return torch.cat([z.real, z.imag], dim=-1).to(x.dtype)


def reference_ccgqa(attn: CCGQAAttention, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    bsz, seq_len, _ = x.shape
    hq, hk, d = attn.n_heads, attn.n_kv_heads, attn.head_dim
    g = hq // hk
    q_pre, k_pre, v = (x @ attn.wqkv.weight.T).split([hq * d, hk * d, hk * d], dim=-1)
    q = ref_head_conv(ref_depthwise(q_pre, attn.q_seq_conv.weight).view(bsz, seq_len, hq, d),
                      attn.q_head_conv.weight)
    k = ref_head_conv(ref_depthwise(k_pre, attn.k_seq_conv.weight).view(bsz, seq_len, hk, d),
                      attn.k_head_conv.weight)
    qp, kp = q_pre.view(bsz, seq_len, hq, d), k_pre.view(bsz, seq_len, hk, d)
    m_q = torch.stack([(qp[:, :, j] + kp[:, :, j // g]) / 2 for j in range(hq)], dim=2)
    m_k = torch.stack([m_q[:, :, kv * g:(kv + 1) * g].mean(dim=2) for kv in range(hk)], dim=2)
    q, k = q + m_q, k + m_k
    v = v.view(bsz, seq_len, hk, d).clone()
    if attn.value_shift:  # the last floor(hk/2) KV heads read the previous token's value (zero before the first)
        first = hk - hk // 2
        shifted = torch.zeros_like(v[:, :, first:])
        shifted[:, 1:] = v[:, :-1, first:]
        v[:, :, first:] = shifted
    beta = attn.log_beta.exp()
    q = math.sqrt(d) * q / q.norm(dim=-1, keepdim=True)
    k = math.sqrt(d) * k / k.norm(dim=-1, keepdim=True) * beta[:, None]
    q, k = ref_rope(q, positions), ref_rope(k, positions)
    mask = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    heads = []
    for j in range(hq):
        scores = q[:, :, j] @ k[:, :, j // g].transpose(1, 2) / math.sqrt(d)
        p = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        heads.append(p @ v[:, :, j // g])
    return torch.cat(heads, dim=-1) @ attn.wo.weight.T


def positions_for(bsz: int, seq_len: int) -> torch.Tensor:
    return torch.arange(seq_len).expand(bsz, seq_len)


# ---------------------------------------------------------------- tests
@pytest.mark.parametrize("steps", [0, 1, 2, 5, 9])
def test_causal_shift_matches_definition(steps):
    x = torch.randn(2, 6, 3)
    y = causal_shift(x, steps)
    for t in range(6):
        expected = x[:, t - steps] if t - steps >= 0 else torch.zeros(2, 3)
        torch.testing.assert_close(y[:, t], expected)


@pytest.mark.parametrize("kernel", [1, 2, 3])
def test_depthwise_conv_matches_loops_and_conv1d(kernel):
    conv = CausalDepthwiseConv(12, kernel)
    conv.reset_parameters()
    x = torch.randn(2, 9, 12)
    y = conv(x)
    torch.testing.assert_close(y, ref_depthwise(x, conv.weight))
    # nn.Conv1d semantics: left padding k-1, kernel reversed (tap i multiplies x[t-i])
    w = conv.weight.flip(-1).unsqueeze(1)  # [C, 1, k]
    y_conv = F.conv1d(F.pad(x.transpose(1, 2), (kernel - 1, 0)), w, groups=12).transpose(1, 2)
    torch.testing.assert_close(y, y_conv)


@pytest.mark.parametrize("kernel", [1, 2, 3])
def test_head_conv_matches_loops_and_grouped_conv1d(kernel):
    heads, d = 3, 4
    conv = CausalHeadConv(heads, d, kernel)
    conv.reset_parameters()
    x = torch.randn(2, 7, heads, d)
    y = conv(x)
    torch.testing.assert_close(y, ref_head_conv(x, conv.weight))
    # as nn.Conv1d(H*D, H*D, k, groups=H): W_conv[h*D + o, c, k-1-i] = W[h, i*D + c, o]
    w_conv = torch.empty(heads * d, d, kernel)
    for h in range(heads):
        for i in range(kernel):
            w_conv[h * d:(h + 1) * d, :, kernel - 1 - i] = conv.weight[h, i * d:(i + 1) * d, :].T
    xs = x.reshape(2, 7, heads * d).transpose(1, 2)
    y_conv = F.conv1d(F.pad(xs, (kernel - 1, 0)), w_conv, groups=heads).transpose(1, 2)
    torch.testing.assert_close(y.reshape(2, 7, heads * d), y_conv, atol=1e-5, rtol=1e-5)


def test_head_conv_mixes_channels_only_within_a_head():
    conv = CausalHeadConv(2, 4, 2)
    conv.reset_parameters()
    x = torch.randn(1, 5, 2, 4)
    x2 = x.clone()
    x2[:, :, 1] += 1.0  # perturb head 1 only
    torch.testing.assert_close(conv(x)[:, :, 0], conv(x2)[:, :, 0])
    assert not torch.allclose(conv(x)[:, :, 1], conv(x2)[:, :, 1])


@pytest.mark.parametrize("kw", [
    dict(),                                           # 4 q heads / 2 kv heads, kernels 2/2
    dict(conv_kernel_seq=3, conv_kernel_ch=1),        # the original HYDRA's sequence kernel
    dict(n_heads=2, n_kv_heads=2, head_dim=16),       # no GQA grouping
    dict(n_heads=8, n_kv_heads=2, head_dim=8),        # group of 4
    dict(n_heads=3, n_kv_heads=3, head_dim=16, dim=48),  # odd KV heads: the last one shifts
    dict(n_heads=2, n_kv_heads=1, head_dim=16),       # one KV head: no shift
])
def test_ccgqa_matches_reference_formula(kw):
    attn = build_attention(**kw)
    x = torch.randn(2, 11, attn.wqkv.in_features)
    pos = positions_for(2, 11)
    cache = rope_cache(attn.head_dim, 64)
    torch.testing.assert_close(attn(x, pos, cache), reference_ccgqa(attn, x, pos), atol=2e-5, rtol=1e-4)


def test_ccgqa_uses_given_positions_for_rope():
    """Arbitrary (gathered) positions: matches the reference at those positions, not at 0..T-1."""
    attn = build_attention()
    x = torch.randn(2, 6, 64)
    pos = torch.tensor([[0, 3, 4, 9, 20, 21], [1, 2, 5, 6, 7, 30]])
    cache = rope_cache(attn.head_dim, 64)
    out = attn(x, pos, cache)
    torch.testing.assert_close(out, reference_ccgqa(attn, x, pos), atol=2e-5, rtol=1e-4)
    assert not torch.allclose(out, attn(x, positions_for(2, 6), cache), atol=1e-4)


def test_ccgqa_depends_only_on_relative_positions():
    attn = build_attention()
    x = torch.randn(1, 8, 64)
    pos = positions_for(1, 8)
    cache = rope_cache(attn.head_dim, 64)
    torch.testing.assert_close(attn(x, pos, cache), attn(x, pos + 17, cache), atol=1e-5, rtol=1e-4)


def test_qk_norm_makes_output_invariant_to_qk_projection_scale():
    """q and k are L2-normalised after the (linear) convs and coupling: scaling W_q, W_k changes nothing."""
    attn = build_attention()
    x = torch.randn(2, 9, 64)
    pos = positions_for(2, 9)
    cache = rope_cache(attn.head_dim, 64)
    before = attn(x, pos, cache)
    with torch.no_grad():
        attn.wqkv.weight[: attn.q_dim + attn.kv_dim] *= 7.5
    torch.testing.assert_close(attn(x, pos, cache), before, atol=1e-5, rtol=1e-4)


def test_temperature_sharpens_attention():
    """Large beta -> each query attends (almost) only to its best key; beta multiplies the logits."""
    attn = build_attention(value_shift=False)
    x = torch.randn(1, 10, 64)
    pos = positions_for(1, 10)
    cache = rope_cache(attn.head_dim, 64)
    with torch.no_grad():
        attn.log_beta.fill_(math.log(50.0))
    sharp = attn(x, pos, cache)
    torch.testing.assert_close(sharp, reference_ccgqa(attn, x, pos), atol=1e-4, rtol=1e-3)
    with torch.no_grad():
        attn.log_beta.fill_(0.0)
    assert not torch.allclose(sharp, attn(x, pos, cache), atol=1e-3)


def test_value_shift_reads_previous_token_for_half_the_kv_heads():
    """With attention forced onto the diagonal, each head's output is its value row: the shifted
    half of the KV heads must return the previous token's value, the other half the current one."""
    args = small_args(n_heads=2, n_kv_heads=2, head_dim=32, conv_kernel_seq=1, conv_kernel_ch=1)
    attn = CCGQAAttention(args)
    attn.init_weights(0.1, 0.1)
    captured = {}

    def fake_attend(q, k, v, scale=None):
        captured["v"] = v
        return v  # identity attention: out[t] = v[t]

    attn.attend = fake_attend
    x = torch.randn(1, 5, 64)
    attn(x, positions_for(1, 5), rope_cache(32, 64))
    v_raw = (x @ attn.wqkv.weight.T)[..., attn.q_dim + attn.kv_dim:].view(1, 5, 2, 32)
    torch.testing.assert_close(captured["v"][:, :, 0], v_raw[:, :, 0])
    torch.testing.assert_close(captured["v"][:, 1:, 1], v_raw[:, :-1, 1])
    torch.testing.assert_close(captured["v"][:, 0, 1], torch.zeros(1, 32))


def test_ccgqa_is_causal():
    attn = build_attention()
    x = torch.randn(1, 12, 64)
    pos = positions_for(1, 12)
    cache = rope_cache(attn.head_dim, 64)
    x2 = x.clone()
    x2[:, 7] += 3.0
    a, b = attn(x, pos, cache), attn(x2, pos, cache)
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7], b[:, 7])


def test_every_ccgqa_parameter_gets_a_gradient():
    attn = build_attention()
    x = torch.randn(2, 9, 64)
    attn(x, positions_for(2, 9), rope_cache(attn.head_dim, 64)).square().sum().backward()
    for name, p in attn.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_ccgqa_shapes_follow_compression():
    args = small_args(dim=128, n_heads=4, n_kv_heads=2, head_dim=8)
    assert args.q_compression == 4 and args.kv_compression == 8
    attn = CCGQAAttention(args)
    assert attn.wqkv.weight.shape == (32 + 2 * 16, 128)
    assert attn.wo.weight.shape == (128, 32)
    assert attn.q_head_conv.weight.shape == (4, 2 * 8, 8)


def test_block_residual_update_equals_forward_minus_input():
    block = CCGQABlock(small_args())
    block.init_weights(0.1, 0.1)
    x = torch.randn(2, 8, 64)
    pos, cache = positions_for(2, 8), rope_cache(8, 64)
    out, stats = block(x, pos, cache)
    delta, delta_stats = block.residual_update(x, pos, cache)
    assert stats == {} and delta_stats == {}  # a dense FFN reports nothing
    torch.testing.assert_close(out, x + delta)
    # pre-norm structure: h = x + attn(norm(x)); out = h + ffn(norm(h))
    h = x + block.attention(block.attention_norm(x), pos, cache)
    torch.testing.assert_close(out, h + block.feed_forward(block.ffn_norm(h)))
