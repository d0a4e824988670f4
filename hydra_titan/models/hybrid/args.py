"""Arguments and flavors of the hybrid SSM-attention family (seed 001, DESIGN §3.9).

`variant` picks the layer recipe: v1 (baseline) places SSM and attention layers by
`layer_pattern`; v2 (routed) runs the SSM on every token of every layer and causal attention
on a routed `attn_capacity` fraction; v3 (hierarchical) is v1 whose SSM layers also read a
global SSM over chunk summaries of earlier chunks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...kernels.topk_route import check_routing_kernel
from ..common.args import check_positive, replace_args
from ..common.ssm import SSMConfig
from ..llama.args import LlamaModelArgs

VARIANT_ALIASES = {"v1": "v1", "baseline": "v1", "v2": "v2", "routed": "v2", "v3": "v3", "hierarchical": "v3"}
VARIANT_DESCRIPTIONS = {
    "v1": "baseline: SSM and attention layers by layer_pattern",
    "v2": "routed: SSM on every token, causal attention on a routed attn_capacity fraction",
    "v3": "hierarchical: v1 plus a global SSM over summaries of earlier chunks",
}


@dataclass
class HybridModelArgs(LlamaModelArgs):
    """llama's attention / FFN / MoE sizes (its attention layers are llama's), plus the SSM and routing."""

    n_layers: int = 4
    variant: str = "v1"
    # v1/v3: "alternating" (attention on even layers, SSM on odd) or one letter per layer, S or A
    layer_pattern: str = "alternating"
    # v2: fraction of tokens that get attention (static top-k in training, threshold in eval)
    attn_capacity: float = 0.15
    router_aux_weight: float = 0.01
    eval_routing: str = "threshold"
    routing_kernel: str = "triton"   # v2's top-k selection (kernels/topk_route.py): "triton" on CUDA, or "torch"
    # v3: tokens per summary at each level of the global SSM (an int or a list)
    global_chunk: Any = (64,)
    global_expand: int = 1

    ssm_head_dim: int = 64
    ssm_state_dim: int = 128
    ssm_groups: int = 1
    ssm_expand: int = 2
    ssm_conv_kernel: int = 4
    ssm_chunk_size: int = 64
    ssm_backend: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()  # sizes, heads, MoE
        check_positive(self, ("global_expand",))
        if self.variant not in VARIANT_ALIASES:
            raise ValueError(f"variant must be one of {sorted(VARIANT_ALIASES)}, got {self.variant!r}")
        self.variant = VARIANT_ALIASES[self.variant]
        if not 0.0 < self.attn_capacity <= 1.0:
            raise ValueError(f"attn_capacity must be in (0, 1], got {self.attn_capacity}")
        if self.eval_routing not in ("threshold", "topk"):
            raise ValueError(f"eval_routing must be 'threshold' or 'topk', got {self.eval_routing!r}")
        check_routing_kernel(self.routing_kernel)
        chunks = (self.global_chunk,) if isinstance(self.global_chunk, int) else tuple(self.global_chunk)
        if not chunks or any(not isinstance(c, int) or c <= 0 for c in chunks):
            raise ValueError(f"global_chunk must be a positive int or a non-empty list of them, got {self.global_chunk!r}")
        self.global_chunk = chunks
        self.layer_kinds()  # checks layer_pattern
        self.ssm_config.check(self.dim)
        if self.variant == "v3":
            try:
                self.global_ssm_config.check(self.dim)
            except ValueError as e:
                raise ValueError(f"v3's global SSM (global_expand={self.global_expand}): {e}") from None

    @property
    def ssm_config(self) -> SSMConfig:
        return SSMConfig(head_dim=self.ssm_head_dim, state_dim=self.ssm_state_dim, groups=self.ssm_groups,
                         expand=self.ssm_expand, conv_kernel=self.ssm_conv_kernel, chunk_size=self.ssm_chunk_size,
                         backend=self.ssm_backend)

    @property
    def global_ssm_config(self) -> SSMConfig:
        """v3's global SSM: the token mixer's sizes, narrower (`global_expand`)."""
        groups = self.ssm_groups if (self.global_expand * self.dim // self.ssm_head_dim) % self.ssm_groups == 0 else 1
        return SSMConfig(head_dim=self.ssm_head_dim, state_dim=self.ssm_state_dim, groups=groups,
                         expand=self.global_expand, conv_kernel=self.ssm_conv_kernel,
                         chunk_size=self.ssm_chunk_size, backend=self.ssm_backend)

    def layer_kinds(self) -> list[str]:
        """Per layer: "S" (SSM), "A" (attention) or, in v2, "R" (SSM + routed attention)."""
        if self.variant == "v2":
            return ["R"] * self.n_layers
        if self.layer_pattern == "alternating":
            return ["A" if i % 2 == 0 else "S" for i in range(self.n_layers)]
        pattern = self.layer_pattern.upper()
        bad = sorted(set(pattern) - {"S", "A"})
        if bad:
            raise ValueError(f"layer_pattern may hold only S (SSM) and A (attention), got {bad} in "
                             f"{self.layer_pattern!r}")
        if len(pattern) != self.n_layers:
            raise ValueError(f"layer_pattern {self.layer_pattern!r} has {len(pattern)} letters but "
                             f"n_layers={self.n_layers}")
        return list(pattern)

    def replace(self, **overrides: Any) -> "HybridModelArgs":
        return replace_args(self, overrides)


def _flavor(dim: int, n_layers: int, n_heads: int, n_kv_heads: int, head_dim: int, **kw) -> HybridModelArgs:
    return HybridModelArgs(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim, **kw)


# 125M is the seed's size (d 768, 12 layers, 12 heads, conv 4, expand 2). 1B has llama 1B's width,
# heads and FFN, with 20 layers (10 SSM + 10 attention) so its non-embedding parameters are within
# 3% of llama 1B's 24 layers (an SSM layer's projections are 2.5x an attention layer's).
HYBRID_FLAVORS: dict[str, HybridModelArgs] = {
    "debug": _flavor(256, 4, 4, 2, 64, vocab_size=4096, max_seq_len=1024, ssm_head_dim=32, ssm_state_dim=32,
                     global_chunk=(16,)),
    "125M": _flavor(768, 12, 12, 4, 64),
    "350M": _flavor(1024, 24, 16, 4, 64),
    "1B": _flavor(2048, 20, 16, 4, 128),
}
