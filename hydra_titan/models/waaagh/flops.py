"""FLOPs per training token and active parameters of the Waaagh family (DESIGN §4).

Weights cost 6 FLOPs per token. Attention scores cost 12 · width per query-key pair the kernels
compute: the local head's masked attention and the sparse head's scores both run over all T keys
(the window and the top-k are masks, not skipped work), the memory head over its slots. No
causal discount. Nothing is routed, so executed == dense. Components removed by `args.ablate`
count nothing (a removed "moe" counts the dense SwiGLU that replaces it).
"""

from __future__ import annotations

from ..common.moe import ffn_active_params
from ..common.ssm import ssm_flops_per_token, ssm_weight_params
from ..registry import FlopCount
from .args import HEAD_NAMES, WaaaghModelArgs


def _heads_weight_params(args: WaaaghModelArgs) -> int:
    """Weights of the built specialist heads, and W_o when any head is built."""
    d, w = args.dim, args.head_width
    per_head = {"local": d * 3 * w, "sparse": d * 3 * w, "memory": d * w,
                "prediction": d * d + d * w + w * d}  # prediction: fc1, fc2, readout
    built = [name for name in HEAD_NAMES if args.has(name)]
    return sum(per_head[name] for name in built) + (d * d if built else 0)  # + W_o


def _keys_scored(args: WaaaghModelArgs, seq_len: int) -> int:
    """Query-key pairs per query of the built attention heads."""
    return (seq_len * args.has("local") + seq_len * args.has("sparse")
            + args.memory_slots * args.has("memory"))


def _totals(args: WaaaghModelArgs, seq_len: int) -> tuple[float, float]:
    head = args.dim * args.vocab_size
    flops, params = 6.0 * head, float(head)
    scores = 12 * args.head_width * _keys_scored(args, seq_len)
    ssm_params = ssm_weight_params(args.dim, args.ssm_config) if args.has("ssm") else 0
    ssm_flops = ssm_flops_per_token(args.dim, args.ssm_config) if args.has("ssm") else 0.0
    for i in range(args.n_layers):
        routed, hidden = args.ffn_layout(i)
        linears = _heads_weight_params(args) + ffn_active_params(args, args.dim, hidden, routed)
        flops += ssm_flops + 6 * linears + scores
        params += ssm_params + linears
    return flops, params


def waaagh_flops_per_token(args: WaaaghModelArgs, seq_len: int) -> FlopCount:
    flops = _totals(args, seq_len)[0]
    return FlopCount(executed=flops, dense=flops)


def waaagh_active_params(args: WaaaghModelArgs, seq_len: int = 2048) -> float:
    return _totals(args, seq_len)[1]
