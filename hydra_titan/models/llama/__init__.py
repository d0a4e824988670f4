"""Dense Llama-style baseline of the same sizes as HYDRA (for fair A/B runs)."""

from ..registry import ModelSpec, register_model_spec
from .args import LLAMA_FLAVORS, LlamaModelArgs
from .flops import llama_flops_per_token, llama_active_params
from .model import LlamaModel, TransformerBlock

__all__ = ["LlamaModelArgs", "LLAMA_FLAVORS", "LlamaModel", "TransformerBlock", "llama_flops_per_token",
           "llama_active_params", "LLAMA_SPEC"]

LLAMA_SPEC = register_model_spec(ModelSpec(
    name="llama",
    model_cls=LlamaModel,
    args_cls=LlamaModelArgs,
    flavors=LLAMA_FLAVORS,
    flops_per_token=llama_flops_per_token,
    description="dense Llama baseline of HYDRA's sizes (the A/B reference)",
    default_config="train_configs/llama_debug.toml",
    active_params=llama_active_params,
))
