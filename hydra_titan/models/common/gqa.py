"""Grouped-query attention with RoPE: llama's attention, and the attention layers of the hybrids.

`args` needs dim, n_heads, n_kv_heads, head_dim and attn_backend. With a decode `cache` the keys
and values of earlier tokens come from its K/V (DESIGN §3.11).
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import get_attention_backend
from .cache import CacheView, KVCache
from .init import trunc_normal_
from .rope import apply_rope


class GQAttention(nn.Module):
    def __init__(self, args):  # LlamaModelArgs or any args with the fields above
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.q_dim, self.kv_dim = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
        self.wqkv = nn.Linear(args.dim, self.q_dim + 2 * self.kv_dim, bias=False)
        self.wo = nn.Linear(self.q_dim, args.dim, bias=False)
        self.attend = get_attention_backend(args.attn_backend)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rope: torch.Tensor,
                cache: CacheView | None = None) -> torch.Tensor:
        bsz, seq_len, _ = x.shape
        q, k, v = self.wqkv(x).split([self.q_dim, self.kv_dim, self.kv_dim], dim=-1)
        q = apply_rope(q.view(bsz, seq_len, self.n_heads, self.head_dim), rope, positions)
        k = apply_rope(k.view(bsz, seq_len, self.n_kv_heads, self.head_dim), rope, positions)
        v = v.view(bsz, seq_len, self.n_kv_heads, self.head_dim)
        if cache is None:
            out = self.attend(q, k, v)
        else:  # decode: the keys and values of every earlier token come from the cache
            out = KVCache.of(cache, self.n_kv_heads, self.head_dim).attend(q, k, v, cache.valid)
        return self.wo(out.reshape(bsz, seq_len, self.q_dim))

    def init_weights(self, init_std: float, out_std: float) -> None:
        trunc_normal_(self.wqkv.weight, init_std)
        trunc_normal_(self.wo.weight, out_std)
