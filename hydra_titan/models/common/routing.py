"""Token selection, gather and scatter shared by MoD and MoR (DESIGN §3.4).

Training uses a static k per sequence (top-k, the selected tokens kept in
their causal order: `kernels/topk_route.py`, a Triton op on CUDA): shapes never
depend on data and a routed block compiles whole. Evaluation selects by threshold, which is causal; its counts
vary per sequence, so the selection is right-padded to the batch's largest
count with a `valid` mask. Right padding cannot influence real tokens: every
operation inside a block (convolutions, value shift, attention) is causal.
"""

from __future__ import annotations

import math

import torch


def static_capacity(capacity: float, seq_len: int) -> int:
    """k = ceil(capacity * seq_len), at least 1: a Python int, so shapes stay static."""
    return max(1, min(seq_len, math.ceil(capacity * seq_len - 1e-9)))


def kept_counts(capacities: tuple[float, ...], n_tokens: int) -> list[int]:
    """Tokens that top-k routing keeps at each recursion step when n_tokens enter the block.

    Capacities never increase (HydraModelArgs checks it), so the counts never do either: the
    model, its depth histogram and the FLOP count all read them from here.
    """
    return [static_capacity(c, n_tokens) for c in capacities]


def threshold_indices(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Selected positions of each row of a bool mask [B, N], right-padded.

    Returns (idx [B, K], valid [B, K]) with K = the largest count in the batch
    (at least 1, so blocks never see an empty sequence). Padding entries point
    at unselected positions and are marked invalid. Eval-only: reads K on the host (a decode step's
    one token needs no selection: see `threshold_select`).
    """
    counts = mask.sum(dim=-1)
    k = max(1, int(counts.max()))
    # a stable descending sort of the mask puts the selected positions first, in order
    idx = torch.sort(mask.to(torch.int8), dim=-1, descending=True, stable=True).indices[:, :k]
    valid = torch.arange(k, device=mask.device) < counts[:, None]
    return idx, valid


def threshold_select(keep: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Threshold routing's selection of a bool mask [B, N]: (idx, valid) as `threshold_indices`, or
    (None, keep) for one token (N = 1, a decode step): that token runs or not, so nothing is gathered,
    `keep` masks its update, and no count is read on the host (the step can be captured)."""
    return (None, keep) if keep.shape[1] == 1 else threshold_indices(keep)


def router_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """fp32 router scores x·w for x [B, N, E] and a router weight [1, E] -> [B, N].

    Written as a reduction rather than an `nn.Linear` with one output: a GEMM of
    width 1 is a separate, poorly aligned kernel (and two more in backward) in
    every recursion step, while a reduction fuses with the neighbouring
    elementwise work under torch.compile. Accumulates in fp32.
    """
    return (x.float() * weight.reshape(-1).float()).sum(dim=-1)


def _expand_index(idx: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """idx [B, K] broadcast over the trailing dims of `like` [B, N, ...]."""
    if like.dim() == 2:
        return idx
    return idx.view(*idx.shape, *([1] * (like.dim() - 2))).expand(-1, -1, *like.shape[2:])


class _GatherDistinct(torch.autograd.Function):
    """x.gather(1, index) whose backward is a plain scatter.

    Autograd's gather backward is a scatter-*add* (atomics; in bf16 inductor
    hands it to an eager kernel, which splits the fused graph). Routing indices
    are distinct within a row, so a scatter into zeros is the same gradient.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(index)
        ctx.x_shape = x.shape
        return x.gather(1, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (index,) = ctx.saved_tensors
        return grad.new_zeros(ctx.x_shape).scatter(1, index, grad), None


class _ScatterAddDistinct(torch.autograd.Function):
    """x + update placed at `index` (distinct within a row), without atomics.

    Forward is gather -> add -> scatter (one fused kernel under inductor, and
    bitwise the value scatter_add gives: one addition per element); backward
    is the identity for x and a gather for the update.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, update: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(index)
        return x.scatter(1, index, x.gather(1, index) + update)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (index,) = ctx.saved_tensors
        return grad, None, grad.gather(1, index)


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x[b, idx[b, j]] for x [B, N, ...] and idx [B, K] -> [B, K, ...]; idx distinct within a row."""
    index = _expand_index(idx, x)
    if not x.is_floating_point():
        return x.gather(1, index)
    return _GatherDistinct.apply(x, index)


def take_tokens(x: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    """gather_tokens(x, idx), or x itself for idx None: every token of x is selected."""
    return x if idx is None else gather_tokens(x, idx)


def scatter_add_tokens(x: torch.Tensor, idx: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """Out-of-place x[b, idx[b, j]] += update[b, j] (indices within a row are distinct)."""
    return _ScatterAddDistinct.apply(x, _expand_index(idx, x), update)
