"""The four specialist heads of a Waaagh block (DESIGN §3.10), each mapping [B, T, dim] to its
quarter of the width [B, T, dim/4], split into `n_heads` attention heads.

* local: causal sliding-window attention over the last `window` positions;
* sparse global: causal attention where each query keeps its top `sparse_k` past keys by score.
  The future is masked *before* the top-k (the seed masked after, so future keys took places);
  queries are scored `sparse_query_chunk` at a time, so the score tile is [chunk, T], not [T, T];
* memory: attention over a learned bank of `memory_slots` key/value vectors (read-only);
* prediction: an MLP whose output feeds the mixture and, through a readout, predicts the next
  position's block input (stop-gradient target; the auxiliary loss of `predict_aux_weight`).

With a decode `cache` the local and sparse heads keep their keys and values (DESIGN §3.11); the
memory and prediction heads have no state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..common.cache import CacheView, KVCache
from ..common.init import trunc_normal_
from ..common.rope import apply_rope
from .args import WaaaghModelArgs


class _RotaryQKV(nn.Module):
    """q, k, v [B, T, H, D] of one specialist, q and k rotated by position."""

    def __init__(self, args: WaaaghModelArgs):
        super().__init__()
        self.n_heads, self.head_dim = args.n_heads, args.head_dim
        self.wqkv = nn.Linear(args.dim, 3 * args.head_width, bias=False)

    def qkv(self, x: torch.Tensor, positions: torch.Tensor, rope: torch.Tensor):
        bsz, seq_len, _ = x.shape
        q, k, v = (t.view(bsz, seq_len, self.n_heads, self.head_dim) for t in self.wqkv(x).chunk(3, dim=-1))
        return apply_rope(q, rope, positions), apply_rope(k, rope, positions), v

    def init_weights(self, init_std: float, out_std: float) -> None:
        trunc_normal_(self.wqkv.weight, init_std)


def _attention(q, k, v, mask):
    """softmax(q k^T / sqrt(D)) v with a bool mask [B or 1, T, L] of readable keys: [B, T, H, D]."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2).to(q.dtype),
                                         v.transpose(1, 2).to(q.dtype), attn_mask=mask[:, None])
    return out.transpose(1, 2)


def _causal_mask(seq_len: int, device, window: int | None = None) -> torch.Tensor:
    i = torch.arange(seq_len, device=device)
    mask = i[None, :] <= i[:, None]
    if window is not None:
        mask = mask & (i[None, :] > i[:, None] - window)
    return mask[None]


class LocalHead(_RotaryQKV):
    def __init__(self, args: WaaaghModelArgs):
        super().__init__(args)
        self.window = args.window

    def forward(self, x, positions, rope, cache: CacheView | None = None) -> torch.Tensor:
        q, k, v = self.qkv(x, positions, rope)
        if cache is None:
            out = _attention(q, k, v, _causal_mask(x.shape[1], x.device, self.window))
        else:
            keys, values, mask = KVCache.of(cache, self.n_heads, self.head_dim).append(
                k, v, cache.valid, positions, self.window)
            out = _attention(q, keys, values, mask)
        return out.flatten(2)


def sparse_select(scores: torch.Tensor, allowed: torch.Tensor, k: int) -> torch.Tensor:
    """Which keys each query keeps [..., T, L]: its k best-scoring *allowed* keys (all while fewer exist).

    Disallowed (future, padding) keys are removed before the top-k, so they never take a place."""
    masked = scores.masked_fill(~allowed, float("-inf"))
    kth = masked.topk(min(k, masked.shape[-1]), dim=-1).values[..., -1:]
    return allowed & (masked >= kth)


def sparse_attention(q, k, v, allowed, top_k: int, query_chunk: int) -> torch.Tensor:
    """Attention of q [B, T, H, D] over its top_k allowed keys of k, v [B, L, H, D]; allowed [B|1, T, L]."""
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2).to(q.dtype), v.transpose(1, 2).to(q.dtype)
    scale = q.shape[-1] ** -0.5
    outs = []
    for start in range(0, q.shape[1], query_chunk):
        stop = min(start + query_chunk, q.shape[1])
        scores = (qh[:, :, start:stop] @ kh.transpose(-1, -2)).float() * scale    # [B, H, c, L]
        keep = sparse_select(scores, allowed[:, None, start:stop], top_k)
        probs = scores.masked_fill(~keep, float("-inf")).softmax(dim=-1).to(vh.dtype)
        outs.append(probs @ vh)
    return torch.cat(outs, dim=2).transpose(1, 2)


class SparseGlobalHead(_RotaryQKV):
    def __init__(self, args: WaaaghModelArgs):
        super().__init__(args)
        self.top_k, self.query_chunk = args.sparse_k, args.sparse_query_chunk

    def forward(self, x, positions, rope, cache: CacheView | None = None) -> torch.Tensor:
        q, k, v = self.qkv(x, positions, rope)
        if cache is None:
            keys, values, allowed = k, v, _causal_mask(x.shape[1], x.device)
        else:
            keys, values, allowed = KVCache.of(cache, self.n_heads, self.head_dim).append(k, v, cache.valid)
        return sparse_attention(q, keys, values, allowed, self.top_k, self.query_chunk).flatten(2)


class MemoryHead(nn.Module):
    """Every position reads the same learned bank of key/value slots (persistent memory)."""

    def __init__(self, args: WaaaghModelArgs):
        super().__init__()
        self.n_heads, self.head_dim = args.n_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.head_width, bias=False)
        self.memory_k = nn.Parameter(torch.empty(args.memory_slots, args.n_heads, args.head_dim))
        self.memory_v = nn.Parameter(torch.empty(args.memory_slots, args.n_heads, args.head_dim))

    def forward(self, x, positions=None, rope=None, cache: CacheView | None = None) -> torch.Tensor:
        bsz, seq_len, _ = x.shape
        q = self.wq(x).view(bsz, seq_len, self.n_heads, self.head_dim).transpose(1, 2)
        k, v = (m.to(q.dtype).transpose(0, 1).expand(bsz, -1, -1, -1) for m in (self.memory_k, self.memory_v))
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)

    def init_weights(self, init_std: float, out_std: float) -> None:
        trunc_normal_(self.wq.weight, init_std)
        trunc_normal_(self.memory_k, 1.0)  # unit-scale keys: the scores start comparable to q·k of tokens
        trunc_normal_(self.memory_v, init_std)


class PredictionHead(nn.Module):
    """MLP(x) feeds the mixture; readout(MLP(x_t)) is trained to predict the block input at t + 1."""

    def __init__(self, args: WaaaghModelArgs):
        super().__init__()
        self.fc1 = nn.Linear(args.dim, args.dim, bias=False)
        self.fc2 = nn.Linear(args.dim, args.head_width, bias=False)
        self.readout = nn.Linear(args.head_width, args.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(x)))

    def aux_loss(self, predicted: torch.Tensor, block_input: torch.Tensor) -> torch.Tensor:
        """MSE of readout(prediction at t) against the block input at t + 1 (no gradient into the target)."""
        if block_input.shape[1] < 2:
            return predicted.new_zeros((), dtype=torch.float32)
        guess = self.readout(predicted[:, :-1]).float()
        return F.mse_loss(guess, block_input[:, 1:].detach().float())

    def init_weights(self, init_std: float, out_std: float) -> None:
        for linear in (self.fc1, self.fc2, self.readout):
            trunc_normal_(linear.weight, init_std)
