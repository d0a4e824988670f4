"""Token selection, gather and scatter shared by MoD and MoR (DESIGN §3.4).

Training uses a static k per sequence (top-k, then `sort` so the selected
tokens keep their causal order): shapes never depend on data and a routed block
compiles whole. Evaluation selects by threshold, which is causal; its counts
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


def topk_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the k highest scores of each row [B, N], in increasing order."""
    return scores.topk(k, dim=-1, sorted=False).indices.sort(dim=-1).values


def threshold_indices(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Selected positions of each row of a bool mask [B, N], right-padded.

    Returns (idx [B, K], valid [B, K]) with K = the largest count in the batch
    (at least 1, so blocks never see an empty sequence). Padding entries point
    at unselected positions and are marked invalid. Eval-only: reads K on the host.
    """
    counts = mask.sum(dim=-1)
    k = max(1, int(counts.max()))
    # a stable descending sort of the mask puts the selected positions first, in order
    idx = torch.sort(mask.to(torch.int8), dim=-1, descending=True, stable=True).indices[:, :k]
    valid = torch.arange(k, device=mask.device) < counts[:, None]
    return idx, valid


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x[b, idx[b, j]] for x [B, N, ...] and idx [B, K] -> [B, K, ...]."""
    if x.dim() == 2:
        return x.gather(1, idx)
    return x.gather(1, idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:]))


def scatter_add_tokens(x: torch.Tensor, idx: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """Out-of-place x[b, idx[b, j]] += update[b, j] (indices within a row are distinct)."""
    if x.dim() == 2:
        return x.scatter_add(1, idx, update)
    return x.scatter_add(1, idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand_as(update), update)
