"""Dense Llama-style baseline arguments and the flavors matched to HYDRA's.

A llama flavor has the same width, head_dim, FFN and vocabulary as the hydra
flavor of the same name, with n_layers = the hydra flavor's n_mor_blocks: the
same number of distinct blocks (and about the same parameter count), each run
once. It is the A/B baseline: same stack, same kernels, no routing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..common.args import check_heads, check_positive, replace_args
from ..common.ffn import swiglu_hidden_dim
from ..common.moe import MoEArgs
from ..hydra.args import HYDRA_FLAVORS


@dataclass
class LlamaModelArgs(MoEArgs):
    """Sizes of the dense baseline; the MoE fields (moe_num_experts > 0 swaps FFNs for experts) come from MoEArgs."""

    vocab_size: int = 100_352
    dim: int = 512
    n_layers: int = 2
    n_heads: int = 8
    n_kv_heads: int = 2
    head_dim: int = 64
    ffn_dim_multiplier: float = 1.0
    multiple_of: int = 256
    norm_eps: float = 1e-5
    rope_theta: float = 10_000.0
    max_seq_len: int = 4096
    attn_backend: str = "sdpa"

    def __post_init__(self) -> None:
        check_positive(self, ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "max_seq_len"))
        check_heads(self.n_heads, self.n_kv_heads, self.head_dim)
        self.validate_moe(self.dim, self.ffn_hidden_dim, self.n_layers)

    @property
    def ffn_hidden_dim(self) -> int:
        return swiglu_hidden_dim(self.dim, self.ffn_dim_multiplier, self.multiple_of)

    def replace(self, **overrides: Any) -> "LlamaModelArgs":
        return replace_args(self, overrides)


def _matched(hydra_flavor: str) -> LlamaModelArgs:
    h = HYDRA_FLAVORS[hydra_flavor]
    n_heads = h.dim // h.head_dim
    # uncompressed attention: dim/head_dim query heads; KV heads 1/4 of them (Llama-3's ratio)
    return LlamaModelArgs(vocab_size=h.vocab_size, dim=h.dim, n_layers=h.n_mor_blocks, n_heads=n_heads,
                          n_kv_heads=max(1, n_heads // 4), head_dim=h.head_dim,
                          ffn_dim_multiplier=h.ffn_dim_multiplier, multiple_of=h.multiple_of)


LLAMA_FLAVORS: dict[str, LlamaModelArgs] = {name: _matched(name) for name in HYDRA_FLAVORS}
