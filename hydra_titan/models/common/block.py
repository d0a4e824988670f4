"""The pre-norm transformer block of both families: x + attn(norm(x)), then + SwiGLU(norm(.)).

Only the attention differs (llama's GQA, HYDRA's CCGQA), so it is passed in and
everything else — norms, FFN, init order, state-dict names — is written once.
"""

from __future__ import annotations

import torch
from torch import nn

from .ffn import SwiGLU
from .norms import RMSNorm


class PreNormBlock(nn.Module):
    """`attention(x, positions, rope_cache)` must map [B, S, dim] to [B, S, dim] and have `init_weights`."""

    def __init__(self, attention: nn.Module, *, dim: int, ffn_hidden_dim: int, norm_eps: float):
        super().__init__()
        self.attention_norm = RMSNorm(dim, norm_eps)
        self.attention = attention
        self.ffn_norm = RMSNorm(dim, norm_eps)
        self.feed_forward = SwiGLU(dim, ffn_hidden_dim)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rope_cache: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), positions, rope_cache)
        return h + self.feed_forward(self.ffn_norm(h))

    def residual_update(self, x: torch.Tensor, positions: torch.Tensor, rope_cache: torch.Tensor) -> torch.Tensor:
        """block(x) - x, computed without the cancellation of subtracting x.

        MoD and MoR scale or route this update, so they take it directly.
        """
        attn = self.attention(self.attention_norm(x), positions, rope_cache)
        return attn + self.feed_forward(self.ffn_norm(x + attn))

    def init_weights(self, init_std: float, out_std: float) -> None:
        self.attention_norm.reset_parameters()
        self.ffn_norm.reset_parameters()
        self.attention.init_weights(init_std, out_std)
        self.feed_forward.init_weights(init_std, out_std)
