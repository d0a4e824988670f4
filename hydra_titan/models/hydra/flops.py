"""FLOPs per training token and parameter counts for HYDRA (DESIGN §4).

Convention (torchtitan's, so figures compare): a weight costs 6 FLOPs per token
that passes through it (forward + backward); the LM head counts, the embedding
lookup does not; attention costs 12 * heads * head_dim * keys per query token,
with no causal discount. Capacities are applied exactly as the model applies
them (k = ceil(capacity * n) at each level), so the count is what the step
executes, not an idealisation. A MoE block's FFN counts its router, the k
chosen experts and the shared ones, not all E.
"""

from __future__ import annotations

from ..common.moe import ffn_active_params
from ..registry import FlopCount
from .args import HydraModelArgs
from ..common.routing import kept_counts, static_capacity


def block_weight_params(args: HydraModelArgs, layer_id: int = 0) -> int:
    """Weights a token multiplies through in one application of block `layer_id` (norm gains excluded)."""
    q_dim, kv_dim, hd = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim, args.head_dim
    qkv = args.dim * (q_dim + 2 * kv_dim)
    seq_convs = (q_dim + kv_dim) * args.conv_kernel_seq
    head_convs = (args.n_heads + args.n_kv_heads) * args.conv_kernel_ch * hd * hd
    wo = q_dim * args.dim
    ffn = ffn_active_params(args, args.dim, args.ffn_hidden_dim, args.is_block_moe(layer_id))
    return qkv + seq_convs + head_convs + wo + ffn


def _tokens_per_step(args: HydraModelArgs, layer_id: int, seq_len: int, dense: bool) -> tuple[int, list[int]]:
    """(tokens entering the MoR block, tokens processed at each recursion step) for one sequence."""
    hard_mod = args.is_mod_layer(layer_id) and args.mod_mode == "topk" and not dense
    n_in = static_capacity(args.mod_capacity, seq_len) if hard_mod else seq_len
    if dense or args.mor_mode == "gaussian":
        return n_in, [n_in] * args.recursions
    return n_in, kept_counts(args.mor_step_capacities, n_in)


def _per_token(args: HydraModelArgs, seq_len: int, dense: bool) -> tuple[float, float]:
    """(weight-params applied per token, attention FLOPs per token), averaged over the sequence."""
    attn_per_query_key = 12 * args.n_heads * args.head_dim
    params, attn = 0.0, 0.0
    for layer_id in range(args.n_mor_blocks):
        p_block = block_weight_params(args, layer_id)
        n_in, steps = _tokens_per_step(args, layer_id, seq_len, dense)
        if args.is_mod_layer(layer_id):
            params += args.dim                          # MoD router on every token
        n_routers = 1 if args.mor_mode == "gaussian" else args.recursions
        params += n_routers * args.dim * n_in / seq_len  # MoR routers score the block's input tokens
        for n in steps:
            params += p_block * n / seq_len
            attn += attn_per_query_key * n * n / seq_len
    params += args.dim * args.vocab_size               # LM head
    return params, attn


def hydra_flops_per_token(args: HydraModelArgs, seq_len: int) -> FlopCount:
    p_exec, a_exec = _per_token(args, seq_len, dense=False)
    p_dense, a_dense = _per_token(args, seq_len, dense=True)
    return FlopCount(executed=6 * p_exec + a_exec, dense=6 * p_dense + a_dense)


def hydra_active_params(args: HydraModelArgs, seq_len: int = 2048) -> float:
    """Weights applied per token with the routing capacities: each recursion counted, LM head in."""
    active, _ = _per_token(args, seq_len, dense=False)
    return active
