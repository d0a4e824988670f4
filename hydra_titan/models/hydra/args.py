"""HYDRA model arguments: one dataclass, validated at construction.

Heads are given in the compressed (latent) space: the query compression is
C1 = dim / (n_heads * head_dim) and the key/value compression
C2 = dim / (n_kv_heads * head_dim) >= C1 (DESIGN §3.1). Flavors keep head_dim
at 64 or 128 and vary the number of heads, never their width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from ...kernels.topk_route import TOPK_ROUTE_KERNELS
from ..common.args import check_heads, check_positive, replace_args
from ..common.ffn import swiglu_hidden_dim
from ..common.moe import MoEArgs

MoDMode = Literal["topk", "soft"]
MoRMode = Literal["topk", "gaussian"]
EvalRouting = Literal["threshold", "topk"]

_CHOICES: dict[str, tuple[str, ...]] = {
    "mod_mode": ("topk", "soft"),
    "mor_mode": ("topk", "gaussian"),
    "eval_routing": ("threshold", "topk"),
    "routing_kernel": tuple(TOPK_ROUTE_KERNELS),
}


@dataclass
class HydraModelArgs(MoEArgs):
    """HYDRA's sizes, CCGQA, MoD and MoR settings; the MoE fields (moe_num_experts > 0 swaps each chosen
    block's SwiGLU for experts, shared across its recursions like the rest of the block) come from MoEArgs."""

    # sizes
    vocab_size: int = 100_352
    dim: int = 512
    n_mor_blocks: int = 2
    recursions: int = 2
    n_heads: int = 4            # query heads in the latent space
    n_kv_heads: int = 2         # key/value heads in the latent space
    head_dim: int = 64
    ffn_dim_multiplier: float = 1.0
    multiple_of: int = 256
    norm_eps: float = 1e-5
    rope_theta: float = 10_000.0
    max_seq_len: int = 4096
    # CCGQA
    conv_kernel_seq: int = 2    # depthwise causal conv along the sequence
    conv_kernel_ch: int = 2     # per-head channel-mixing causal conv
    value_shift: bool = True    # the last floor(n_kv_heads/2) KV heads read the previous token's value
    attn_backend: str = "sdpa"
    # top-k selection of MoD and MoR (kernels/topk_route.py): "triton" on CUDA (else torch), or "torch"
    routing_kernel: str = "triton"
    # Mixture-of-Depths
    mod_capacity: float = 0.75
    mod_every: int = 1          # route blocks i with (i+1) % mod_every == 0; 0 = no MoD
    mod_aux_weight: float | None = None   # None: 0.01 * (L/32) * sqrt(dim/768)
    mod_mode: MoDMode = "topk"
    # Mixture-of-Recursions
    mor_capacities: tuple[float, ...] | None = None   # None: (R - r)/R for r = 0..R-1
    mor_mode: MoRMode = "topk"
    mor_router_alpha: float = 1.0
    mor_aux_weight: float = 1e-3
    mor_z_loss_weight: float = 0.0
    mor_gaussian_sigma: float = 1.0
    # evaluation-time routing (DESIGN §3.4): causal threshold, or the training top-k
    eval_routing: EvalRouting = "threshold"

    def __post_init__(self) -> None:
        if self.mor_capacities is not None:
            self.mor_capacities = tuple(float(c) for c in self.mor_capacities)
        self.validate()

    # ------------------------------------------------------------ derived
    @property
    def ffn_hidden_dim(self) -> int:
        return swiglu_hidden_dim(self.dim, self.ffn_dim_multiplier, self.multiple_of)

    @property
    def q_compression(self) -> float:
        return self.dim / (self.n_heads * self.head_dim)

    @property
    def kv_compression(self) -> float:
        return self.dim / (self.n_kv_heads * self.head_dim)

    @property
    def effective_depth(self) -> int:
        return self.n_mor_blocks * self.recursions

    @property
    def mod_aux_weight_value(self) -> float:
        """The original HYDRA auto-scaling: 0.01 * (L / 32) * sqrt(dim / 768)."""
        if self.mod_aux_weight is not None:
            return self.mod_aux_weight
        return 0.01 * (self.effective_depth / 32) * math.sqrt(self.dim / 768)

    @property
    def mor_step_capacities(self) -> tuple[float, ...]:
        if self.mor_capacities is not None:
            return self.mor_capacities
        r = self.recursions
        return tuple((r - i) / r for i in range(r))

    def is_block_moe(self, layer_id: int) -> bool:
        return self.is_moe_layer(layer_id, self.n_mor_blocks)

    def is_mod_layer(self, layer_id: int) -> bool:
        return self.mod_every > 0 and (layer_id + 1) % self.mod_every == 0

    def replace(self, **overrides: Any) -> "HydraModelArgs":
        """A copy with some fields changed; unknown names raise ValueError."""
        return replace_args(self, overrides)

    # ------------------------------------------------------------ checks
    def validate(self) -> None:
        check_positive(self, ("vocab_size", "dim", "n_mor_blocks", "recursions", "n_heads", "n_kv_heads",
                              "head_dim", "max_seq_len", "conv_kernel_seq", "conv_kernel_ch"))
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        check_heads(self.n_heads, self.n_kv_heads, self.head_dim)
        if self.dim % (self.n_heads * self.head_dim):
            raise ValueError(
                f"dim ({self.dim}) must be divisible by n_heads*head_dim ({self.n_heads}*{self.head_dim}): "
                "the query compression dim/(n_heads*head_dim) must be an integer")
        if self.dim % (self.n_kv_heads * self.head_dim):
            raise ValueError(
                f"dim ({self.dim}) must be divisible by n_kv_heads*head_dim ({self.n_kv_heads}*{self.head_dim}): "
                "the key/value compression dim/(n_kv_heads*head_dim) must be an integer")
        if not 0.0 < self.mod_capacity <= 1.0:
            raise ValueError(f"mod_capacity must be in (0, 1], got {self.mod_capacity}")
        if self.mod_every < 0:
            raise ValueError(f"mod_every must be >= 0, got {self.mod_every}")
        caps = self.mor_step_capacities
        if len(caps) != self.recursions:
            raise ValueError(f"mor_capacities has {len(caps)} entries but recursions={self.recursions}")
        for c in caps:
            if not 0.0 < c <= 1.0:
                raise ValueError(f"mor_capacities entries must be in (0, 1], got {caps}")
        if any(b > a for a, b in zip(caps, caps[1:])):
            raise ValueError(f"mor_capacities must not increase with the recursion step, got {caps}")
        if self.mor_gaussian_sigma <= 0:
            raise ValueError(f"mor_gaussian_sigma must be positive, got {self.mor_gaussian_sigma}")
        self.validate_moe(self.dim, self.ffn_hidden_dim, self.n_mor_blocks)



def _flavor(dim: int, n_mor_blocks: int, recursions: int, n_heads: int, n_kv_heads: int, head_dim: int,
            **kw) -> HydraModelArgs:
    return HydraModelArgs(dim=dim, n_mor_blocks=n_mor_blocks, recursions=recursions, n_heads=n_heads,
                          n_kv_heads=n_kv_heads, head_dim=head_dim, **kw)


# The one size table (DESIGN §3.5). Vocab 100,352 = cl100k_base's 100,277 ids padded to a
# multiple of 128; the trainer resizes to the tokenizer it runs with. Heads are latent heads:
# q compression C1 = dim / (n_heads * head_dim), kv compression C2 = dim / (n_kv_heads * head_dim).
HYDRA_FLAVORS: dict[str, HydraModelArgs] = {
    # the vocabulary of kjv_bpe_4k, the built-in tokenizer for CPU runs
    "debug": _flavor(512, 2, 2, n_heads=4, n_kv_heads=2, head_dim=64, vocab_size=4096),
    "100M": _flavor(768, 8, 4, n_heads=6, n_kv_heads=2, head_dim=64),
    "250M": _flavor(1024, 12, 4, n_heads=4, n_kv_heads=2, head_dim=64),
    "500M": _flavor(1536, 16, 4, n_heads=6, n_kv_heads=2, head_dim=64),
    "750M": _flavor(1792, 20, 4, n_heads=14, n_kv_heads=2, head_dim=64),
    "900M": _flavor(2048, 20, 4, n_heads=4, n_kv_heads=2, head_dim=128),
    "1B": _flavor(2048, 24, 4, n_heads=4, n_kv_heads=2, head_dim=128),
    "1.5B": _flavor(2560, 24, 5, n_heads=10, n_kv_heads=2, head_dim=128),
    "4B": _flavor(4096, 40, 4, n_heads=8, n_kv_heads=4, head_dim=128),
}
