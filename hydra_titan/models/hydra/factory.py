"""`create_ccgqa_mod_mor_model`: the original HYDRA README's entry point.

Kept so that code written against the original package runs unchanged (the
original README's example, verbatim):

    model = create_ccgqa_mod_mor_model(vocab_size=32000, dim=768, n_mor_blocks=8, recursions=4,
                                       n_heads=12, n_kv_heads=3, compression_factor=4, capacity_ratio=0.75)
    out = model(input_ids); out["logits"], out["aux_loss"], out["ponder_loss"]

As in the original, `compression_factor` shrinks the query space to
dim / compression_factor, split into `n_heads` heads (head_dim follows: 16
above, thinner than the flavors' 64/128, which SDPA runs much faster); the
key/value space holds `n_kv_heads` heads of the same width (3 above: the last
one reads the previous token's value). Any HydraModelArgs field is a keyword,
e.g. `moe_num_experts=8` for a MoE HYDRA.
"""

from __future__ import annotations

from typing import Any

import torch

from .args import HydraModelArgs
from .model import HydraModel


def create_ccgqa_mod_mor_model(
    vocab_size: int,
    dim: int,
    n_mor_blocks: int,
    recursions: int,
    n_heads: int,
    n_kv_heads: int,
    compression_factor: int = 4,
    capacity_ratio: float = 0.75,
    *,
    device: torch.device | str | None = None,
    **kwargs: Any,
) -> HydraModel:
    """Build and initialise a HydraModel; extra keyword arguments are HydraModelArgs fields."""
    if compression_factor <= 0 or dim % compression_factor:
        raise ValueError(f"dim ({dim}) must be divisible by compression_factor ({compression_factor})")
    latent = dim // compression_factor
    if n_heads <= 0 or latent % n_heads:
        raise ValueError(f"dim/compression_factor ({latent}) must be divisible by n_heads ({n_heads})")
    args = HydraModelArgs(vocab_size=vocab_size, dim=dim, n_mor_blocks=n_mor_blocks, recursions=recursions,
                          n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=latent // n_heads,
                          mod_capacity=capacity_ratio, **kwargs)
    with torch.device("meta"):
        model = HydraModel(args)
    model.to_empty(device=device or "cpu")
    model.init_weights()
    return model
