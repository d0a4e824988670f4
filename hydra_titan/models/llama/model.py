"""Dense Llama-style decoder: the A/B baseline, sharing HYDRA's common layers.

Keeps the same decoder contract (tok_embeddings, layers ModuleDict, norm,
output, init_weights) and the same output mapping as HYDRA; its router terms
are zero, so the loss and metrics code needs no special case.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..common.attention import get_attention_backend
from ..common.ffn import SwiGLU
from ..common.norms import RMSNorm
from ..common.rope import apply_rope, rope_cache
from ..common.validation import check_token_ids
from .args import LlamaModelArgs

INIT_STD = 0.02


class GQAttention(nn.Module):
    def __init__(self, args: LlamaModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.q_dim, self.kv_dim = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
        self.wqkv = nn.Linear(args.dim, self.q_dim + 2 * self.kv_dim, bias=False)
        self.wo = nn.Linear(self.q_dim, args.dim, bias=False)
        self.attend = get_attention_backend(args.attn_backend)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        bsz, seq_len, _ = x.shape
        q, k, v = self.wqkv(x).split([self.q_dim, self.kv_dim, self.kv_dim], dim=-1)
        q = apply_rope(q.view(bsz, seq_len, self.n_heads, self.head_dim), rope, positions)
        k = apply_rope(k.view(bsz, seq_len, self.n_kv_heads, self.head_dim), rope, positions)
        out = self.attend(q, k, v.view(bsz, seq_len, self.n_kv_heads, self.head_dim))
        return self.wo(out.reshape(bsz, seq_len, self.q_dim))

    def init_weights(self, init_std: float, out_std: float) -> None:
        nn.init.trunc_normal_(self.wqkv.weight, std=init_std, a=-3 * init_std, b=3 * init_std)
        nn.init.trunc_normal_(self.wo.weight, std=out_std, a=-3 * out_std, b=3 * out_std)


class TransformerBlock(nn.Module):
    def __init__(self, args: LlamaModelArgs):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = GQAttention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = SwiGLU(args.dim, args.ffn_hidden_dim)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), positions, rope)
        return h + self.feed_forward(self.ffn_norm(h))

    def init_weights(self, init_std: float, out_std: float) -> None:
        self.attention_norm.reset_parameters()
        self.ffn_norm.reset_parameters()
        self.attention.init_weights(init_std, out_std)
        self.feed_forward.init_weights(init_std, out_std)


class LlamaModel(nn.Module):
    def __init__(self, args: LlamaModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(args) for i in range(args.n_layers)})
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.register_buffer("rope_cache", rope_cache(args.head_dim, args.max_seq_len, args.rope_theta),
                             persistent=False)

    @torch.no_grad()
    def init_weights(self, buffer_device: torch.device | str | None = None) -> None:
        device = buffer_device if buffer_device is not None else self.rope_cache.device
        self.rope_cache = rope_cache(self.args.head_dim, self.args.max_seq_len, self.args.rope_theta, device=device)
        nn.init.normal_(self.tok_embeddings.weight)
        out_std = INIT_STD / math.sqrt(2 * self.args.n_layers)
        for layer in self.layers.values():
            layer.init_weights(INIT_STD, out_std)
        self.norm.reset_parameters()
        final_std = self.args.dim ** -0.5
        nn.init.trunc_normal_(self.output.weight, std=final_std, a=-3 * final_std, b=3 * final_std)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        check_token_ids(tokens, self.args.vocab_size, self.args.max_seq_len)
        bsz, seq_len = tokens.shape
        if positions is None:
            positions = torch.arange(seq_len, device=tokens.device).expand(bsz, seq_len)
        h = self.tok_embeddings(tokens)
        for layer in self.layers.values():
            h = layer(h, positions, self.rope_cache)
        logits = self.output(self.norm(h))
        zero = logits.new_zeros((), dtype=torch.float32)
        return {"logits": logits, "aux_loss": zero, "ponder_loss": zero}
