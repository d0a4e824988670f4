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
