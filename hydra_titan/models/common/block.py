"""The pre-norm transformer block of every family: x + attn(norm(x)), then + FFN(norm(.)).

Only the attention differs (llama's GQA, HYDRA's CCGQA), so it is passed in and
everything else — norms, FFN (dense SwiGLU or MoE), init order, state-dict
names — is written once. Both calls return (tensor, stats): a MoE FFN reports
its expert loads (and Switch loss) there, a dense one nothing.
"""

from __future__ import annotations

import torch
from torch import nn

from .cache import CacheView
from .moe import MoEArgs, build_feed_forward, feed_forward_with_stats
from .norms import RMSNorm

Stats = dict[str, torch.Tensor]


class PreNormBlock(nn.Module):
    """`attention(x, positions, rope_cache, cache=None)` must map [B, S, dim] to [B, S, dim] and have
    `init_weights`; with a `CacheView` it appends to its decode state (DESIGN §3.11).

    `moe`: the model's MoE args when this block carries experts, None for a dense SwiGLU.
    """

    def __init__(self, attention: nn.Module, *, dim: int, ffn_hidden_dim: int, norm_eps: float,
                 moe: MoEArgs | None = None):
        super().__init__()
        self.attention_norm = RMSNorm(dim, norm_eps)
        self.attention = attention
        self.ffn_norm = RMSNorm(dim, norm_eps)
        self.feed_forward = build_feed_forward(dim, ffn_hidden_dim, moe)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rope_cache: torch.Tensor,
                cache: CacheView | None = None) -> tuple[torch.Tensor, Stats]:
        h = x + self.attention(self.attention_norm(x), positions, rope_cache, cache=cache)
        out, stats = feed_forward_with_stats(self.feed_forward, self.ffn_norm(h))
        return h + out, stats

    def residual_update(self, x: torch.Tensor, positions: torch.Tensor, rope_cache: torch.Tensor,
                        cache: CacheView | None = None) -> tuple[torch.Tensor, Stats]:
        """(block(x) - x, stats), the update computed without the cancellation of subtracting x.

        MoD and MoR scale or route this update, so they take it directly.
        """
        attn = self.attention(self.attention_norm(x), positions, rope_cache, cache=cache)
        out, stats = feed_forward_with_stats(self.feed_forward, self.ffn_norm(x + attn))
        return attn + out, stats

    def init_weights(self, init_std: float, out_std: float) -> None:
        self.attention_norm.reset_parameters()
        self.ffn_norm.reset_parameters()
        self.attention.init_weights(init_std, out_std)
        self.feed_forward.init_weights(init_std, out_std)
