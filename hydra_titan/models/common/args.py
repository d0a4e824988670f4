"""Helpers shared by the model-argument dataclasses of every family."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

T = TypeVar("T")


def replace_args(args: T, overrides: dict[str, Any]) -> T:
    """dataclasses.replace that names unknown fields instead of a bare TypeError."""
    names = {f.name for f in dataclasses.fields(args)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"unknown model argument(s) {unknown} for {type(args).__name__}; "
                         f"known: {sorted(names)}")
    return dataclasses.replace(args, **overrides)


def check_positive(args: object, names: tuple[str, ...]) -> None:
    for name in names:
        if getattr(args, name) <= 0:
            raise ValueError(f"{name} must be positive, got {getattr(args, name)}")


def check_heads(n_heads: int, n_kv_heads: int, head_dim: int) -> None:
    """GQA needs whole groups; RoPE rotates pairs of channels."""
    if n_heads % n_kv_heads:
        raise ValueError(f"n_heads ({n_heads}) must be divisible by n_kv_heads ({n_kv_heads})")
    if head_dim % 2:
        raise ValueError(f"head_dim must be even (RoPE rotates pairs), got {head_dim}")
