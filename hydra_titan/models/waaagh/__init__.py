"""Waaagh family (seed 003): SSM backbone + local / sparse-global / memory / prediction heads + MoE."""

from ..registry import ModelSpec, ParallelizeOptions, register_model_spec
from ...kernels.ssd import ssd_scan_op
from .args import WAAAGH_FLAVORS, WaaaghModelArgs
from .compat import OrkyHydraWaaaghModel
from .flops import waaagh_active_params, waaagh_flops_per_token
from .model import WaaaghBlock, WaaaghModel

__all__ = ["WaaaghModelArgs", "WAAAGH_FLAVORS", "WaaaghModel", "WaaaghBlock", "OrkyHydraWaaaghModel",
           "waaagh_flops_per_token", "waaagh_active_params", "WAAAGH_SPEC"]

WAAAGH_SPEC = register_model_spec(ModelSpec(
    name="waaagh",
    model_cls=WaaaghModel,
    args_cls=WaaaghModelArgs,
    flavors=WAAAGH_FLAVORS,
    flops_per_token=waaagh_flops_per_token,
    active_params=waaagh_active_params,
    parallelize_options=ParallelizeOptions(ac_extra_save_ops=(ssd_scan_op(),)),
    description="SSM + local, sparse-global, memory and prediction heads + MoE (seed 003)",
    default_config="train_configs/waaagh_debug.toml",
))
