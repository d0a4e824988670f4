"""HYDRA: CCGQA attention + Mixture-of-Depths + Mixture-of-Recursions."""

from ..registry import ModelSpec, ParallelizeOptions, register_model_spec
from .args import HYDRA_FLAVORS, HydraModelArgs
from .ccgqa import CCGQABlock, CCGQAttention
from .factory import create_ccgqa_mod_mor_model
from .flops import hydra_flops_per_token, hydra_active_params
from .model import HydraLayer, HydraModel
from .mod import MoDRouter
from .mor import MoRBlock

__all__ = ["HydraModelArgs", "HYDRA_FLAVORS", "HydraModel", "HydraLayer", "CCGQABlock", "CCGQAttention",
           "MoDRouter", "MoRBlock", "create_ccgqa_mod_mor_model", "hydra_flops_per_token", "hydra_active_params", "HYDRA_SPEC"]

HYDRA_SPEC = register_model_spec(ModelSpec(
    name="hydra",
    model_cls=HydraModel,
    args_cls=HydraModelArgs,
    flavors=HYDRA_FLAVORS,
    flops_per_token=hydra_flops_per_token,
    active_params=hydra_active_params,
    # routers are [1, dim] linears: tiny, and their logits drive top-k, so keep them in high precision
    parallelize_options=ParallelizeOptions(float8_skip_fqns=("output", "router")),
))
