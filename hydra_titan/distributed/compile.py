"""torch.compile per block (DESIGN §5).

Each block is compiled in place (`nn.Module.compile`), so parameter names and
state-dict keys do not change. Routed HYDRA blocks have static shapes in
training (static top-k), so `fullgraph=True` holds; evaluation's threshold
routing has data-dependent counts and runs eagerly (see `eager_eval`).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


def apply_compile(model: nn.Module, fullgraph: bool = True, inductor_options: dict | None = None) -> None:
    """Compile every block in place; `inductor_options` are passed to inductor (torch.compile's `options`)."""
    for block in model.layers.values():
        block.compile(fullgraph=fullgraph, options=dict(inductor_options) if inductor_options else None)


def eager_eval():
    """Context in which compiled blocks run eagerly (validation, generation)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()
