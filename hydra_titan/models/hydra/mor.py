"""Mixture-of-Recursions block (Bae et al. 2025, arXiv 2507.10524).

One set of shared weights (a CCGQABlock) applied up to R times. Expert-choice
routing with hierarchical filtering: at step r only the tokens kept at step
r-1 compete, and a per-step router (sigmoid·alpha) keeps the top
k_r = ceil(cap_r·N) of them; capacities do not increase with r, so selected
sets are nested and shapes are static. A kept token gets x + g·f(x + e_r),
e_r being a learned recursion (depth) embedding; the others leave the loop.
Only kept tokens are computed: routing saves real FLOPs (the original HYDRA
ran every recursion on every token and masked the result).

Losses and metrics of the same routers: a BCE loss teaching each step's logit
to predict selection (so evaluation can route causally by threshold), an
optional z-loss, a ponder loss (the routers' mean keep-probability: lowering it
makes threshold routing stop earlier), and a histogram of per-token depth.
The Gaussian mode is the dense alternative of the original design.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...kernels.topk_route import get_topk_route
from ..common.cache import CacheView, child_view
from ..common.init import trunc_normal_
from ..common.moe import merge_moe_stats
from ..common.routing import (gather_tokens, kept_counts, router_logits, scatter_add_tokens, static_capacity,
                              take_tokens, threshold_select)
from .args import HydraModelArgs
from .ccgqa import CCGQABlock


def _masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return x.mean()
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp_min(1.0)


class MoRBlock(nn.Module):
    def __init__(self, args: HydraModelArgs, moe: bool = False):
        super().__init__()
        self.recursions = args.recursions
        self.capacities = args.mor_step_capacities
        self.mode = args.mor_mode
        self.eval_routing = args.eval_routing
        self.alpha = args.mor_router_alpha
        self.sigma = args.mor_gaussian_sigma
        self.z_loss = args.mor_z_loss_weight > 0
        self.select_topk = get_topk_route(args.routing_kernel)
        self.block = CCGQABlock(args, moe=moe)
        self.routers = nn.ModuleList(nn.Linear(args.dim, 1, bias=False) for _ in range(args.recursions))
        self.recursion_emb = nn.Parameter(torch.empty(args.recursions, args.dim))

    def routing_mode(self) -> str:
        if self.mode == "gaussian":
            return "gaussian"
        return "topk" if self.training else self.eval_routing

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rope_cache: torch.Tensor,
                valid: torch.Tensor | None = None, cache: CacheView | None = None) -> tuple[torch.Tensor, dict]:
        """Residual update of x [B, N, E] (output - x) and routing stats.

        `valid` [B, N] marks real tokens when x is a right-padded selection
        (threshold routing of an enclosing MoD router); padding is never kept.
        `cache`: decode state, one namespace per recursion step (the tokens that step processed).
        """
        if cache is not None and valid is None:
            valid = cache.valid
        if self.routing_mode() == "gaussian":
            return self._gaussian(x, positions, rope_cache, cache)
        return self._expert_choice(x, positions, rope_cache, valid, cache)

    # ------------------------------------------------------------ hard routing
    def _expert_choice(self, x, positions, rope_cache, valid, cache=None):
        bsz, n_tokens, _ = x.shape
        h = x
        active: torch.Tensor | None = None    # positions (into x) of the tokens still in the loop
        active_valid = valid
        # top-k depths follow from the static capacities; only threshold routing needs counting
        depth = None if self.routing_mode() == "topk" else x.new_zeros((bsz, n_tokens), dtype=torch.float32)
        aux, z, ponder, ffn_stats = [], [], [], []
        for step in range(self.recursions):
            logits = router_logits(h, self.routers[step].weight)   # one dot product per token
            act_logits = take_tokens(logits, active)
            idx, sel_valid, target = self._select_step(act_logits, active, active_valid, step, n_tokens)

            gate = torch.sigmoid(take_tokens(logits, idx)) * self.alpha
            if sel_valid is not None:
                gate = gate * sel_valid
            block_in = take_tokens(h, idx) + self.recursion_emb[step].to(h.dtype)
            step_cache = child_view(cache, f"step{step}", sel_valid)
            delta, step_stats = self.block.residual_update(block_in, take_tokens(positions, idx), rope_cache, step_cache)
            ffn_stats.append(step_stats)
            update = (gate.unsqueeze(-1) * delta).to(h.dtype)
            h = h + update if idx is None else scatter_add_tokens(h, idx, update)
            if depth is not None:
                ones = torch.ones_like(gate) if sel_valid is None else sel_valid.float()
                depth = depth + ones if idx is None else scatter_add_tokens(depth, idx, ones)

            if target is not None:
                aux.append(F.binary_cross_entropy_with_logits(act_logits, target))
            if self.z_loss:  # only when weighted: every extra reduction is launches in every step
                z.append(_masked_mean(act_logits.pow(2), active_valid))
            ponder.append(_masked_mean(torch.sigmoid(act_logits), active_valid))
            active, active_valid = idx, sel_valid

        zero = x.new_zeros((), dtype=torch.float32)
        stats = {
            "mor_aux": torch.stack(aux).mean() if aux else zero,
            "mor_z": torch.stack(z).mean() if z else zero,
            "ponder": torch.stack(ponder).mean(),
            "mor_depth_hist": (self._static_depth_histogram(n_tokens, x.device) if depth is None
                               else self._depth_histogram(depth, valid)),
            **merge_moe_stats(ffn_stats),  # expert loads over the recursion steps (MoE blocks only)
        }
        return h - x, stats

    def _select_step(self, act_logits, active, active_valid, step, n_tokens):
        """Selection at `step`: k_r = ceil(cap_r * N) of the N tokens that entered the block.

        Returns (positions into x of the kept tokens, their valid mask, the BCE target of the
        active tokens); positions None = every token of x still runs (step 0 at capacity 1)."""
        n_active = act_logits.shape[1]
        if self.routing_mode() == "topk":
            k = static_capacity(self.capacities[step], n_tokens)
            if k >= n_active:         # everyone still active continues
                return active, active_valid, torch.ones_like(act_logits)
            idx, target = self.select_topk(act_logits, k, active)
            return idx, None, target
        # threshold (eval, causal): full-capacity steps keep every active token, as in training
        if self.capacities[step] >= 1.0:
            return active, active_valid, None
        keep = act_logits > 0
        if active_valid is not None:
            keep = keep & active_valid
        sel, sel_valid = threshold_select(keep)
        if sel is None:  # the one token of a decode step: it stays, masked by keep
            return active, sel_valid, None
        return (sel if active is None else gather_tokens(active, sel)), sel_valid, None

    def _static_depth_histogram(self, n_tokens: int, device: torch.device) -> torch.Tensor:
        """Top-k routing keeps k_r = ceil(cap_r * N) tokens at step r: the depth histogram is known."""
        kept = [n_tokens, *kept_counts(self.capacities, n_tokens), 0]
        hist = [(kept[d] - kept[d + 1]) / n_tokens for d in range(self.recursions + 1)]
        # fills, not torch.tensor(list, device=...): that is a blocking host-to-device copy in eager mode
        return torch.stack([torch.full((), h, device=device, dtype=torch.float32) for h in hist])

    def _depth_histogram(self, depth: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """Fraction of (valid) tokens that ran 0..R recursions: [R + 1]."""
        # a comparison, not F.one_hot: that reads the depths' min and max back to the host
        levels = torch.arange(self.recursions + 1, device=depth.device, dtype=depth.dtype)
        onehot = (depth.round()[..., None] == levels).float()
        if valid is None:
            return onehot.mean(dim=(0, 1))
        w = valid.float().unsqueeze(-1)
        return (onehot * w).sum(dim=(0, 1)) / w.sum().clamp_min(1.0)

    # ------------------------------------------------------------ dense alternative
    def _gaussian(self, x, positions, rope_cache, cache=None):
        """Gaussian soft depth: every token runs all R recursions (no compute saved).

        A depth mu in [1, R] is predicted per token (first router, sigmoid);
        the output is the mix of the R recursion outputs weighted by a
        Gaussian N(mu, sigma) over depths. Dense and differentiable; use it as
        an ablation or for static graphs.
        """
        mu = 1.0 + torch.sigmoid(router_logits(x, self.routers[0].weight)) * (self.recursions - 1)
        depths = torch.arange(1, self.recursions + 1, device=x.device, dtype=torch.float32)
        weights = torch.softmax(-((depths - mu.unsqueeze(-1)) ** 2) / (2 * self.sigma ** 2), dim=-1)
        h, mixed, ffn_stats = x, torch.zeros_like(x), []
        for step in range(self.recursions):
            step_cache = child_view(cache, f"step{step}")
            delta, step_stats = self.block.residual_update(h + self.recursion_emb[step].to(h.dtype), positions,
                                                           rope_cache, step_cache)
            h = h + delta
            ffn_stats.append(step_stats)
            mixed = mixed + weights[..., step: step + 1].to(x.dtype) * h
        hist = torch.cat([weights.new_zeros(1), weights.mean(dim=(0, 1))])
        zero = x.new_zeros((), dtype=torch.float32)
        stats = {"mor_aux": zero, "mor_z": zero, "ponder": ((weights * depths).sum(-1).mean()) / self.recursions,
                 "mor_depth_hist": hist, **merge_moe_stats(ffn_stats)}
        return mixed - x, stats

    def init_weights(self, init_std: float, out_std: float) -> None:
        self.block.init_weights(init_std, out_std)
        for router in self.routers:
            trunc_normal_(router.weight, init_std)
        trunc_normal_(self.recursion_emb, init_std)
