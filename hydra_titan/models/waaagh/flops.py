"""FLOPs per training token and active parameters of the Waaagh family (DESIGN §4).

Weights cost 6 FLOPs per token. Attention scores cost 12 · width per query-key pair the kernels
compute: the local head's masked attention and the sparse head's scores both run over all T keys
(the window and the top-k are masks, not skipped work), the memory head over its slots. No
causal discount. Nothing is routed, so executed == dense.
"""

from __future__ import annotations

from ..common.moe import ffn_active_params
from ..common.ssm import ssm_flops_per_token, ssm_weight_params
from ..registry import FlopCount
from .args import WaaaghModelArgs


def _heads_weight_params(args: WaaaghModelArgs) -> int:
    d, w = args.dim, args.head_width
    local_sparse = 2 * d * 3 * w
    memory = d * w
    prediction = d * d + d * w + w * d  # fc1, fc2, readout
    return local_sparse + memory + prediction + d * d  # + W_o


def _totals(args: WaaaghModelArgs, seq_len: int) -> tuple[float, float]:
    head = args.dim * args.vocab_size
    flops, params = 6.0 * head, float(head)
    scores = 12 * args.head_width * (2 * seq_len + args.memory_slots)
    for i in range(args.n_layers):
        ffn = ffn_active_params(args, args.dim, args.ffn_hidden_dim, args.is_moe_layer(i, args.n_layers))
        weights = ssm_weight_params(args.dim, args.ssm_config) + _heads_weight_params(args) + ffn
        flops += ssm_flops_per_token(args.dim, args.ssm_config) + 6 * (weights - ssm_weight_params(args.dim, args.ssm_config)) + scores
        params += weights
    return flops, params


def waaagh_flops_per_token(args: WaaaghModelArgs, seq_len: int) -> FlopCount:
    flops = _totals(args, seq_len)[0]
    return FlopCount(executed=flops, dense=flops)


def waaagh_active_params(args: WaaaghModelArgs, seq_len: int = 2048) -> float:
    return _totals(args, seq_len)[1]
