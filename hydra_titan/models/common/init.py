"""The one weight initialiser every model shares: a normal truncated at 3 standard deviations."""

from __future__ import annotations

import torch
from torch import nn


def trunc_normal_(weight: torch.Tensor, std: float) -> torch.Tensor:
    """In place: N(0, std^2), values beyond +-3 std redrawn."""
    return nn.init.trunc_normal_(weight, std=std, a=-3 * std, b=3 * std)
