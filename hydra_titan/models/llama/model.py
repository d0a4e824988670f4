"""Dense Llama-style decoder: the A/B baseline, sharing HYDRA's common layers.

Keeps the same decoder contract (tok_embeddings, layers ModuleDict, norm,
output, init_weights) and the same output mapping as HYDRA; its router terms
are zero (but the MoE Switch loss, when asked for), so the loss and metrics
code needs no special case.
"""

from __future__ import annotations

import torch
from torch import nn

from ..common.attention import get_attention_backend
from ..common.cache import CacheView, DecodeCache, KVCache
from ..common.decoder import Decoder
from ..common.block import PreNormBlock
from ..common.init import trunc_normal_
from ..common.moe import moe_model_outputs
from ..common.rope import apply_rope
from .args import LlamaModelArgs


class GQAttention(nn.Module):
    def __init__(self, args: LlamaModelArgs):
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


class TransformerBlock(PreNormBlock):
    """A Llama block: grouped-query attention in the shared pre-norm block (with a MoE FFN on MoE layers)."""

    def __init__(self, args: LlamaModelArgs, layer_id: int = 0):
        super().__init__(GQAttention(args), dim=args.dim, ffn_hidden_dim=args.ffn_hidden_dim,
                         norm_eps=args.norm_eps, moe=args if args.is_moe_layer(layer_id, args.n_layers) else None)


class LlamaModel(Decoder):
    def __init__(self, args: LlamaModelArgs):
        layers = nn.ModuleDict({str(i): TransformerBlock(args, i) for i in range(args.n_layers)})
        super().__init__(args, layers, residual_depth=args.n_layers)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                cache: DecodeCache | None = None, valid: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits, per_layer = self.run_layers(tokens, positions, cache, valid)
        zero = logits.new_zeros((), dtype=torch.float32)
        moe_aux, moe_outputs = moe_model_outputs(per_layer, self.args)  # nothing for a dense model
        return {"logits": logits, "aux_loss": zero if moe_aux is None else moe_aux, "ponder_loss": zero,
                **moe_outputs}
