"""RMSNorm and the weightless RMS normalisation used for CCGQA's QK norm.

Computed in float32 and cast back, so bf16 activations do not lose the
normaliser's precision; written as plain tensor ops so torch.compile fuses it.
"""

from __future__ import annotations

import torch
from torch import nn


def rms_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / rms(x) over the last dim, i.e. sqrt(d) * x / ||x||, computed in fp32."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


class RMSNorm(nn.Module):
    """Root-mean-square layer norm with a learnable gain (Zhang & Sennrich 2019)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_normalize(x, self.eps) * self.weight

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
