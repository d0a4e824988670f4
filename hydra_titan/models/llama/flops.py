"""FLOPs per training token and parameter counts for the dense baseline (DESIGN §4)."""

from __future__ import annotations

from ..registry import FlopCount
from .args import LlamaModelArgs


def layer_weight_params(args: LlamaModelArgs) -> int:
    q_dim, kv_dim = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    return args.dim * (q_dim + 2 * kv_dim) + q_dim * args.dim + 3 * args.dim * args.ffn_hidden_dim


def llama_flops_per_token(args: LlamaModelArgs, seq_len: int) -> FlopCount:
    params = args.n_layers * layer_weight_params(args) + args.dim * args.vocab_size
    attn = args.n_layers * 12 * args.n_heads * args.head_dim * seq_len
    flops = 6 * params + attn
    return FlopCount(executed=flops, dense=flops)


def llama_active_params(args: LlamaModelArgs, seq_len: int = 2048) -> float:
    """Every layer and the LM head, once per token (seq_len does not matter to a dense model)."""
    del seq_len
    return args.n_layers * layer_weight_params(args) + args.dim * args.vocab_size
