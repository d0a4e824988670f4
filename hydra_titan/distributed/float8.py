"""float8 training of the large linears through torchao (DESIGN §5 step 1).

Converted on the meta model, before AC, compile and FSDP. Routers, the LM head
and any linear whose dims are not multiples of 16 (a float8 GEMM requirement)
or smaller than `min_dim` (too small to gain) are left in high precision.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)


def float8_module_filter(skip_fqns: tuple[str, ...], min_dim: int = 16):
    def keep(module: nn.Module, fqn: str) -> bool:
        if not isinstance(module, nn.Linear):
            return False
        if any(part in fqn for part in skip_fqns):
            return False
        out_f, in_f = module.weight.shape
        return in_f % 16 == 0 and out_f % 16 == 0 and min(in_f, out_f) >= min_dim

    return keep


def convert_to_float8(model: nn.Module, *, recipe: str, emulate: bool, fsdp_float8_all_gather: bool,
                      skip_fqns: tuple[str, ...], min_dim: int = 16) -> list[str]:
    """Swap eligible nn.Linear for torchao Float8Linear; returns the converted module names."""
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError as e:
        raise ImportError("float8.enable needs torchao (pip install 'hydra_titan[float8]')") from e
    if not emulate and not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)):
        raise ValueError("float8.enable needs a CUDA GPU with float8 support (SM 8.9+); "
                         "set float8.emulate = true to emulate it (tests only)")
    if recipe == "tensorwise":
        config = Float8LinearConfig(enable_fsdp_float8_all_gather=fsdp_float8_all_gather, emulate=emulate)
    else:
        if fsdp_float8_all_gather:
            raise ValueError("float8.enable_fsdp_float8_all_gather works with the tensorwise recipe only")
        config = Float8LinearConfig.from_recipe_name(recipe)
        if emulate:
            config = Float8LinearConfig(**{**config.__dict__, "emulate": True})
    keep = float8_module_filter(skip_fqns, min_dim)
    converted = [fqn for fqn, m in model.named_modules() if keep(m, fqn)]
    convert_to_float8_training(model, config=config, module_filter_fn=keep)
    logger.info("float8 (%s) converted %d linears", recipe, len(converted))
    return converted


def precompute_float8_scales(model: nn.Module) -> None:
    """After the optimizer step: one all-reduce for all float8 all-gather scales (tensorwise + FSDP)."""
    from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

    precompute_float8_dynamic_scale_for_fsdp(model)
