"""Hybrid SSM-attention family (seed 001): v1 baseline, v2 routed, v3 hierarchical (DESIGN §3.9)."""

from ..registry import ModelSpec, ParallelizeOptions, register_model_spec
from ...kernels.ssd import ssd_scan_op
from .args import HYBRID_FLAVORS, VARIANT_DESCRIPTIONS, HybridModelArgs
from .flops import hybrid_active_params, hybrid_flops_per_token
from .model import HierarchicalMixer, HybridModel, RoutedLayer

__all__ = ["HybridModelArgs", "HYBRID_FLAVORS", "HybridModel", "HierarchicalMixer", "RoutedLayer",
           "hybrid_flops_per_token", "hybrid_active_params", "HYBRID_SPEC"]

HYBRID_SPEC = register_model_spec(ModelSpec(
    name="hybrid",
    model_cls=HybridModel,
    args_cls=HybridModelArgs,
    flavors=HYBRID_FLAVORS,
    flops_per_token=hybrid_flops_per_token,
    active_params=hybrid_active_params,
    # selective AC keeps the scan's output (its recompute is a full forward scan)
    parallelize_options=ParallelizeOptions(ac_extra_save_ops=(ssd_scan_op(),)),
    description="SSM-attention hybrids on the Mamba-2 mixer (seed 001)",
    variants=VARIANT_DESCRIPTIONS,
    default_config="train_configs/hybrid_debug.toml",
))
