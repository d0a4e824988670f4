"""Top-k selection of a routing step (MoD, MoR): a PyTorch reference and a Triton op, behind one switch.

Both return, for router scores [B, M] and a static k, the positions of each row's k highest scores
in increasing order (causal order for the selected tokens) and the 0/1 membership row the routers'
BCE loss is trained against; with `source` [B, M] the positions are mapped through it (MoR: the
scores are of the tokens still active, `source` their positions in the block's input).

* `torch`: topk, a sort of its indices, a scatter of ones, a gather of `source`: the CPU path and
  the oracle of the kernel test. Among tied scores `torch.topk` keeps any of them.
* `triton`: `topk_route_triton.py`, one launch per step, registered as the custom op
  `hydra_titan::topk_route` with a fake implementation so a compiled block keeps one graph and a
  captured step records it. Ties keep the earliest positions. Used on CUDA tensors when Triton
  imports and the row fits one program (MAX_ROW scores); any other input takes the `torch` path.

The scores carry no gradient through the selection (the gate reads the scores separately).
"""

from __future__ import annotations

import functools
import importlib
from typing import Callable

import torch

MAX_ROW = 16384   # scores per row the Triton program holds in registers

TopkRouteFn = Callable[[torch.Tensor, int, "torch.Tensor | None"], tuple[torch.Tensor, torch.Tensor]]


def topk_route_torch(scores: torch.Tensor, k: int, source: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions [B, k] in increasing order, 0/1 target [B, M]) with PyTorch ops."""
    scores = scores.detach()
    sel = scores.topk(k, dim=-1, sorted=False).indices.sort(dim=-1).values
    target = torch.zeros_like(scores).scatter(1, sel, 1.0)
    return (sel if source is None else source.gather(1, sel)), target


@functools.cache
def _triton_impl():
    return importlib.import_module(".topk_route_triton", __package__)  # imports triton


@functools.cache
def _triton_importable() -> bool:
    try:
        _triton_impl()
    except ImportError:
        return False
    return True


@torch.library.custom_op("hydra_titan::topk_route", mutates_args=())
def _topk_route_op(scores: torch.Tensor, k: int, source: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    return _triton_impl().topk_route(scores, k, source)


@_topk_route_op.register_fake
def _(scores, k, source):
    return scores.new_empty((scores.shape[0], k), dtype=torch.int64), scores.new_empty(scores.shape)


def topk_route_triton(scores: torch.Tensor, k: int, source: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton op where it applies (CUDA, a row that fits), else the torch path.

    Only tensor metadata is read here, so torch.compile traces the choice; whether Triton imports
    is settled once, by `get_topk_route`, outside any compiled code."""
    if not (scores.is_cuda and scores.dim() == 2 and scores.shape[1] <= MAX_ROW):
        return topk_route_torch(scores, k, source)
    return _topk_route_op(scores.detach(), k, source)


TOPK_ROUTE_KERNELS: dict[str, TopkRouteFn] = {"triton": topk_route_triton, "torch": topk_route_torch}


def check_routing_kernel(name: str) -> None:
    """ValueError naming the choices for an unknown `routing_kernel` (no Triton import: args use it)."""
    if name not in TOPK_ROUTE_KERNELS:
        raise ValueError(f"unknown routing_kernel {name!r}; known: {sorted(TOPK_ROUTE_KERNELS)}")


def get_topk_route(name: str) -> TopkRouteFn:
    """The selection function of `routing_kernel` = name (ValueError naming the choices otherwise)."""
    check_routing_kernel(name)
    if name == "triton" and not _triton_importable():
        return topk_route_torch  # no Triton on this machine: the torch path everywhere
    return TOPK_ROUTE_KERNELS[name]
