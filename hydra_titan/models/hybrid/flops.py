"""FLOPs per training token and active parameters of the hybrid family (DESIGN §4, §3.8).

Weights cost 6 FLOPs per token that passes through them; attention 12·heads·head_dim per
query-key pair, no causal discount; v2's attention runs on f = k/S of the tokens, so its
projections cost f and its score matmuls f² (dense-equivalent: f = 1). The SSD scan counts
the chunked form the kernels execute, per head and token (forward; backward twice that):
the intra-chunk q·k^T and scores·v over the L tokens of the chunk, 2L(N + P), and the chunk
state k^T v plus the state read q h, 4NP. The causal conv is a K-tap multiply-add per channel.
v3's global SSM processes one summary per `global_chunk` tokens.
"""

from __future__ import annotations

from ..common.moe import ffn_active_params
from ..common.ssm import ssm_flops_per_token, ssm_weight_params
from ..common.routing import static_capacity
from ..llama.flops import attention_weight_params
from ..registry import FlopCount
from .args import HybridModelArgs


def _layer_flops(args: HybridModelArgs, layer_id: int, kind: str, seq_len: int, dense: bool) -> tuple[float, float]:
    """(FLOPs per token, weight params per token) of one layer."""
    ffn = ffn_active_params(args, args.dim, args.ffn_hidden_dim, args.is_moe_layer(layer_id, args.n_layers))
    attn_scores = 12 * args.n_heads * args.head_dim * seq_len
    if kind == "A":
        params = attention_weight_params(args) + ffn
        return 6 * params + attn_scores, params
    flops = ssm_flops_per_token(args.dim, args.ssm_config) + 6 * ffn
    params = ssm_weight_params(args.dim, args.ssm_config) + ffn
    if kind == "R":
        f = 1.0 if dense else static_capacity(args.attn_capacity, seq_len) / seq_len
        routed = args.dim + f * attention_weight_params(args)  # the router scores every token
        flops += 6 * routed + attn_scores * f * f
        params += routed
    elif args.variant == "v3":
        for chunk in args.global_chunk:
            flops += ssm_flops_per_token(args.dim, args.global_ssm_config) / chunk
            params += ssm_weight_params(args.dim, args.global_ssm_config) / chunk
    return flops, params


def _totals(args: HybridModelArgs, seq_len: int, dense: bool) -> tuple[float, float]:
    head = args.dim * args.vocab_size
    flops, params = 6.0 * head, float(head)
    for i, kind in enumerate(args.layer_kinds()):
        f, p = _layer_flops(args, i, kind, seq_len, dense)
        flops, params = flops + f, params + p
    return flops, params


def hybrid_flops_per_token(args: HybridModelArgs, seq_len: int) -> FlopCount:
    return FlopCount(executed=_totals(args, seq_len, dense=False)[0], dense=_totals(args, seq_len, dense=True)[0])


def hybrid_active_params(args: HybridModelArgs, seq_len: int = 2048) -> float:
    """Weights applied per token (v2's attention at its routed fraction), LM head in."""
    return _totals(args, seq_len, dense=False)[1]
