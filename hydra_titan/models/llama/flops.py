"""FLOPs per training token and parameter counts for the dense baseline (DESIGN §4).

A MoE layer counts the weights a token really multiplies through: the router,
its k experts and the shared ones (not all E).
"""

from __future__ import annotations

from ..common.moe import ffn_active_params
from ..registry import FlopCount
from .args import LlamaModelArgs


def attention_weight_params(args: LlamaModelArgs) -> int:
    q_dim, kv_dim = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    return args.dim * (q_dim + 2 * kv_dim) + q_dim * args.dim


def layer_weight_params(args: LlamaModelArgs, layer_id: int = 0) -> int:
    """Weights one token multiplies through in layer `layer_id` (its active FFN included)."""
    moe = args.is_moe_layer(layer_id, args.n_layers)
    return attention_weight_params(args) + ffn_active_params(args, args.dim, args.ffn_hidden_dim, moe)


def llama_active_params(args: LlamaModelArgs, seq_len: int = 2048) -> float:
    """Every layer (its active FFN) and the LM head, once per token (seq_len does not matter)."""
    del seq_len
    return sum(layer_weight_params(args, i) for i in range(args.n_layers)) + args.dim * args.vocab_size


def llama_flops_per_token(args: LlamaModelArgs, seq_len: int) -> FlopCount:
    attn = args.n_layers * 12 * args.n_heads * args.head_dim * seq_len
    flops = 6 * llama_active_params(args) + attn
    return FlopCount(executed=flops, dense=flops)
