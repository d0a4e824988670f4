"""HYDRA: CCGQA attention + Mixture-of-Depths + Mixture-of-Recursions (+ an optional MoE FFN).

The original HYDRA's class names (seeds 000/004) are kept as aliases:
`CCGQAMoDMoRModel` (the model), `CCGQAMoDBlockWrapper` (a layer: a MoR block,
wrapped by its MoD router when it routes) and `CCGQAMoRBlock` (the MoR block).
"""

from ..registry import ModelSpec, register_model_spec
from .args import HYDRA_FLAVORS, HydraModelArgs
from .ccgqa import CCGQAAttention, CCGQABlock
from .factory import create_ccgqa_mod_mor_model
from .flops import hydra_flops_per_token, hydra_active_params
from .model import HydraLayer, HydraModel
from ..common.mod import MoDRouter
from .mor import MoRBlock

# the original HYDRA's names for the same classes
CCGQAMoDMoRModel = HydraModel
CCGQAMoDBlockWrapper = HydraLayer
CCGQAMoRBlock = MoRBlock

__all__ = ["HydraModelArgs", "HYDRA_FLAVORS", "HydraModel", "HydraLayer", "CCGQABlock", "CCGQAAttention",
           "MoDRouter", "MoRBlock", "CCGQAMoDMoRModel", "CCGQAMoDBlockWrapper", "CCGQAMoRBlock",
           "create_ccgqa_mod_mor_model", "hydra_flops_per_token", "hydra_active_params", "HYDRA_SPEC"]

HYDRA_SPEC = register_model_spec(ModelSpec(
    name="hydra",
    model_cls=HydraModel,
    args_cls=HydraModelArgs,
    flavors=HYDRA_FLAVORS,
    flops_per_token=hydra_flops_per_token,
    description="CCGQA attention + Mixture-of-Depths + Mixture-of-Recursions (seeds 000/002/004)",
    default_config="train_configs/debug.toml",
    active_params=hydra_active_params,
))
