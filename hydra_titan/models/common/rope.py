"""Rotary position embeddings applied by explicit position ids.

Routed blocks run on gathered subsequences whose tokens keep their original
positions (DESIGN §3.4), so RoPE looks its angles up by position id instead of
assuming positions 0..T-1. The "rotate half" layout (GPT-NeoX) is used: pure
elementwise ops that torch.compile fuses.
"""

from __future__ import annotations

import torch


def rope_cache(head_dim: int, max_seq_len: int, theta: float = 10000.0,
               device: torch.device | str | None = None) -> torch.Tensor:
    """[max_seq_len, head_dim] table: cos in the first half, sin in the second (fp32)."""
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    t = torch.arange(max_seq_len, device=device, dtype=torch.float32)
    angles = torch.outer(t, inv_freq)
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def apply_rope(x: torch.Tensor, cache: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, T, H, D] by the angles of `positions` [B, T] (or [T])."""
    half = x.shape[-1] // 2
    cos_sin = cache[positions]  # [B, T, D] or [T, D]
    if cos_sin.dim() == 2:
        cos_sin = cos_sin.unsqueeze(0)
    cos = cos_sin[..., :half].unsqueeze(-2)  # [B, T, 1, D/2]
    sin = cos_sin[..., half:].unsqueeze(-2)
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).type_as(x)
