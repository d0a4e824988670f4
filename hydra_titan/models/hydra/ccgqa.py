"""Compressed Convolutional Grouped-Query Attention (CCGQA, arXiv 2510.04476).

Attention runs in a compressed latent space: q has n_heads*head_dim = dim/C1
channels, k and v have n_kv_heads*head_dim = dim/C2. Queries and keys pass
through two causal convolutions (a depthwise one along the sequence, then one
that mixes channels within each head), are coupled through the mean of the
pre-convolution latents, L2-normalised with a learnable per-KV-head
temperature, rotated by RoPE at their original positions, and attended with
GQA. Half of the value heads read the previous token (value shift; with an
odd number the last floor(h_k/2), so one KV head shifts none).

The convolutions are written as sums of shifted copies rather than
`nn.Conv1d`: torch.compile fuses them into neighbouring kernels, which made the
block 1.3x faster on an H100 (PLATFORM_NOTES). "Previous token" is always the
previous row of the tensor the module is given: on a routed subsequence that is
the previous *selected* token (DESIGN §3.4).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..common.attention import get_attention_backend
from ..common.block import PreNormBlock
from ..common.cache import CacheView, KVCache, extend_with_window
from ..common.init import trunc_normal_
from ..common.norms import rms_normalize
from ..common.rope import apply_rope
from .args import HydraModelArgs


def causal_shift(x: torch.Tensor, steps: int) -> torch.Tensor:
    """x[:, t - steps] along dim 1, zeros where t - steps < 0."""
    if steps == 0:
        return x
    seq_len = x.shape[1]
    if steps >= seq_len:
        return torch.zeros_like(x)
    pad = x.new_zeros((x.shape[0], steps, *x.shape[2:]))
    return torch.cat([pad, x[:, : seq_len - steps]], dim=1)


class CausalDepthwiseConv(nn.Module):
    """y[t, c] = sum_i weight[c, i] * x[t - i, c]  (one filter per channel)."""

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.empty(channels, kernel_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, C]
        w = self.weight.to(x.dtype)
        out = x * w[:, 0]
        for i in range(1, self.kernel_size):
            out = out + causal_shift(x, i) * w[:, i]
        return out

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.kernel_size)  # nn.Conv1d's default for groups=channels
        nn.init.uniform_(self.weight, -bound, bound)


class CausalHeadConv(nn.Module):
    """Per-head channel-mixing causal conv: y[t, h] = sum_i x[t - i, h] @ W[h, i].

    The weight is stored stacked as [heads, kernel*head_dim, head_dim] so the
    whole conv is one batched matmul over the concatenated shifts.
    """

    def __init__(self, n_heads: int, head_dim: int, kernel_size: int):
        super().__init__()
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.empty(n_heads, kernel_size * head_dim, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, H, D]
        if self.kernel_size == 1:
            stacked = x
        else:
            stacked = torch.cat([causal_shift(x, i) for i in range(self.kernel_size)], dim=-1)
        return torch.einsum("bthi,hio->btho", stacked, self.weight.to(x.dtype))

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.weight.shape[1])  # fan_in = kernel * head_dim
        nn.init.uniform_(self.weight, -bound, bound)


def _causal(fn, x: torch.Tensor, history: int, cache: CacheView | None, name: str) -> torch.Tensor:
    """fn (a causal map reading `history` earlier rows) of x; in decode, over the cached window + x."""
    if cache is None:
        return fn(x)
    return fn(extend_with_window(cache, name, x, history))[:, -x.shape[1]:]


class CCGQAAttention(nn.Module):
    def __init__(self, args: HydraModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.q_dim = args.n_heads * args.head_dim
        self.kv_dim = args.n_kv_heads * args.head_dim
        self.value_shift = args.value_shift
        # one GEMM for the q and k down-projections and the value projection
        self.wqkv = nn.Linear(args.dim, self.q_dim + 2 * self.kv_dim, bias=False)
        self.q_seq_conv = CausalDepthwiseConv(self.q_dim, args.conv_kernel_seq)
        self.k_seq_conv = CausalDepthwiseConv(self.kv_dim, args.conv_kernel_seq)
        self.q_head_conv = CausalHeadConv(args.n_heads, args.head_dim, args.conv_kernel_ch)
        self.k_head_conv = CausalHeadConv(args.n_kv_heads, args.head_dim, args.conv_kernel_ch)
        self.log_beta = nn.Parameter(torch.empty(args.n_kv_heads))  # key temperature per KV head
        self.wo = nn.Linear(self.q_dim, args.dim, bias=False)
        self.attend = get_attention_backend(args.attn_backend)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rope_cache: torch.Tensor,
                cache: CacheView | None = None) -> torch.Tensor:
        """`cache` (decode): the convs' input windows, the shifted heads' previous value, K/V."""
        bsz, seq_len, _ = x.shape
        hq, hk, hd = self.n_heads, self.n_kv_heads, self.head_dim
        q_pre, k_pre, v = self.wqkv(x).split([self.q_dim, self.kv_dim, self.kv_dim], dim=-1)

        def convs(pre, seq_conv, head_conv, heads, name):
            seq = _causal(seq_conv, pre, seq_conv.kernel_size - 1, cache, f"{name}_seq_window")
            return _causal(head_conv, seq.view(bsz, seq_len, heads, hd), head_conv.kernel_size - 1, cache,
                           f"{name}_head_window")

        q = convs(q_pre, self.q_seq_conv, self.q_head_conv, hq, "q")
        k = convs(k_pre, self.k_seq_conv, self.k_head_conv, hk, "k")

        # q-k mean coupling from the pre-conv latents (GQA groups: q head j -> kv head j // g)
        mean_q = 0.5 * (q_pre.view(bsz, seq_len, hk, hq // hk, hd) + k_pre.view(bsz, seq_len, hk, 1, hd))
        q = q + mean_q.reshape(bsz, seq_len, hq, hd)
        k = k + mean_q.mean(dim=3)

        v = v.view(bsz, seq_len, hk, hd)
        if self.value_shift and hk > 1:  # the last floor(hk/2) heads read the previous token (hk = 1: none)
            current = hk - hk // 2
            shifted = _causal(lambda t: causal_shift(t, 1), v[:, :, current:], 1, cache, "v_window")
            v = torch.cat([v[:, :, :current], shifted], dim=2)

        # ||q|| = ||k|| = sqrt(hd); keys scaled by beta. SDPA applies 1/sqrt(hd) once.
        q = rms_normalize(q)
        k = rms_normalize(k) * self.log_beta.exp().to(k.dtype)[:, None]
        q = apply_rope(q, rope_cache, positions)
        k = apply_rope(k, rope_cache, positions)

        if cache is None:
            out = self.attend(q, k, v)
        else:
            out = KVCache.of(cache, hk, hd).attend(q, k, v, cache.valid)
        return self.wo(out.reshape(bsz, seq_len, self.q_dim))

    def init_weights(self, init_std: float, out_std: float) -> None:
        trunc_normal_(self.wqkv.weight, init_std)
        trunc_normal_(self.wo.weight, out_std)
        for conv in (self.q_seq_conv, self.k_seq_conv, self.q_head_conv, self.k_head_conv):
            conv.reset_parameters()
        nn.init.zeros_(self.log_beta)


class CCGQABlock(PreNormBlock):
    """A HYDRA block: CCGQA attention in the shared pre-norm block (MoR applies it up to R times).

    `moe`: this block's FFN is the MoE of `args` (its experts are shared across the recursions).
    """

    def __init__(self, args: HydraModelArgs, moe: bool = False):
        super().__init__(CCGQAAttention(args), dim=args.dim, ffn_hidden_dim=args.ffn_hidden_dim,
                         norm_eps=args.norm_eps, moe=args if moe else None)
