"""SwiGLU feed-forward network (Shazeer 2020), as in Llama."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .init import trunc_normal_


def swiglu_hidden_dim(dim: int, multiplier: float = 1.0, multiple_of: int = 256) -> int:
    """Llama's rule: 2/3 of 4*dim (same params as a 4*dim GELU MLP), scaled, rounded up."""
    hidden = int(multiplier * int(2 * 4 * dim / 3))
    return multiple_of * math.ceil(hidden / multiple_of)


class SwiGLU(nn.Module):
    """out = W2 (silu(W1 x) * W3 x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    def init_weights(self, init_std: float, out_std: float) -> None:
        trunc_normal_(self.w1.weight, init_std)
        for w in (self.w2, self.w3):
            trunc_normal_(w.weight, out_std)
