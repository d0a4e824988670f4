"""Mixture-of-Depths token routing (Raposo et al. 2024, arXiv 2404.02258).

A router scores every token with one scalar r = w·x. In training the top
k = ceil(capacity·S) tokens of each sequence (expert choice, static k) go
through the wrapped block; the others skip it. A selected token's output is
x + sigmoid(r)·Δ(x), Δ being the block's residual update: multiplying by the
router weight puts the router on the task-gradient path (the original HYDRA
did not, and its router collapsed). We use sigmoid(r) rather than the paper's
raw logit so the update scale stays in (0, 1).

Top-k over the sequence is not causal, so an auxiliary BCE loss teaches the
logit to predict top-k membership; evaluation then routes causally with
sigmoid(r) > 0.5 (paper §2.5). The dense `soft` mode is an ablation and a
static-graph option.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ...kernels.topk_route import get_topk_route
from .init import trunc_normal_
from .routing import router_logits, scatter_add_tokens, static_capacity, take_tokens, threshold_select

# inner(x_sel, positions_sel, valid) -> (residual update, stats of the inner block)
InnerFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], tuple[torch.Tensor, dict]]


class MoDRouter(nn.Module):
    def __init__(self, dim: int, capacity: float, mode: str = "topk", eval_routing: str = "threshold",
                 routing_kernel: str = "triton"):
        super().__init__()
        self.capacity = capacity
        self.mode = mode
        self.eval_routing = eval_routing
        self.select_topk = get_topk_route(routing_kernel)
        self.router = nn.Linear(dim, 1, bias=False)

    def routing_mode(self) -> str:
        if self.mode == "soft":
            return "soft"
        return "topk" if self.training else self.eval_routing

    def forward(self, x: torch.Tensor, positions: torch.Tensor, inner: InnerFn,
                token_valid: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """Route x [B, S, E] through `inner`; returns (output, stats with `mod_frac`, `mod_aux`).

        `token_valid` [B, S] (decode: right-padded prompts) keeps padding out of the selection."""
        logits = router_logits(x, self.router.weight)
        mode = self.routing_mode()
        if mode == "soft":
            return self._soft(x, positions, logits, inner, token_valid)
        if mode == "topk":
            idx, target = self.select_topk(logits, static_capacity(self.capacity, x.shape[1]))
            valid = None
        else:  # threshold: sigmoid(r) > 0.5, causal
            keep = logits > 0 if token_valid is None else (logits > 0) & token_valid
            idx, valid = threshold_select(keep)

        delta, stats = inner(take_tokens(x, idx), take_tokens(positions, idx), valid)
        weight = torch.sigmoid(take_tokens(logits, idx))
        if valid is not None:
            weight = weight * valid
        update = (weight.unsqueeze(-1) * delta).to(x.dtype)
        out = x + update if idx is None else scatter_add_tokens(x, idx, update)

        if mode == "topk":
            stats["mod_aux"] = F.binary_cross_entropy_with_logits(logits, target)
            stats["mod_frac"] = logits.new_full((), idx.shape[1] / x.shape[1])  # a fill, no host-to-device copy
        else:
            stats["mod_aux"] = logits.new_zeros(())
            stats["mod_frac"] = (logits > 0).float().mean()
        return out, stats

    def _soft(self, x, positions, logits, inner, token_valid=None) -> tuple[torch.Tensor, dict]:
        """Dense ablation: every token runs the block, output x + sigmoid(r)·Δ.

        Saves no compute at all (every token is processed); it exists for
        static-graph / CUDA-graph runs and as an ablation of hard routing.
        """
        delta, stats = inner(x, positions, token_valid)
        weight = torch.sigmoid(logits)
        stats["mod_aux"] = logits.new_zeros(())
        stats["mod_frac"] = weight.mean()
        return x + (weight.unsqueeze(-1) * delta).to(x.dtype), stats

    def init_weights(self, init_std: float) -> None:
        trunc_normal_(self.router.weight, init_std)
