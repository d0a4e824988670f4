"""Causal attention backends, chosen by name.

Every backend takes q [B, T, Hq, D], k and v [B, T, Hkv, D] (Hq a multiple of
Hkv: grouped-query attention) and returns [B, T, Hq, D]. None of them
materialises repeated K/V: SDPA gets `enable_gqa=True`, flash-attn handles GQA
natively. `scale=None` means 1/sqrt(D).
"""

from __future__ import annotations

import importlib
from typing import Callable, Protocol

import torch
import torch.nn.functional as F


class AttentionFn(Protocol):
    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 *, scale: float | None = None) -> torch.Tensor: ...


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   *, scale: float | None = None) -> torch.Tensor:
    """torch's scaled_dot_product_attention (cuDNN / flash / efficient / math inside)."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        is_causal=True, scale=scale, enable_gqa=q.shape[2] != k.shape[2],
    )
    return out.transpose(1, 2)


def _flash_attn_backend() -> AttentionFn:
    try:
        flash_attn = importlib.import_module("flash_attn")
    except ImportError as e:
        raise ImportError(
            "attention backend 'flash_attn' needs the flash-attn package, which is not importable "
            f"({e}). Install it (pip install 'hydra_titan[flash]') or use attn_backend='sdpa'."
        ) from e

    def flash_attention(q, k, v, *, scale=None):
        return flash_attn.flash_attn_func(q, k, v, softmax_scale=scale, causal=True)

    return flash_attention


ATTENTION_BACKENDS: dict[str, Callable[[], AttentionFn]] = {
    "sdpa": lambda: sdpa_attention,
    "flash_attn": _flash_attn_backend,
}


def get_attention_backend(name: str) -> AttentionFn:
    """Resolve a backend by name; an unknown name lists the known ones."""
    try:
        factory = ATTENTION_BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown attn_backend {name!r}; known: {sorted(ATTENTION_BACKENDS)}") from None
    return factory()
