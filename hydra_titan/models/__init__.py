"""Model families. Importing this package registers `hydra`, `llama`, `hybrid` and `waaagh`."""

from . import hybrid, hydra, llama, waaagh  # noqa: F401  (registers the specs)
from .registry import FlopCount, ModelSpec, ParamReport, get_model_spec, register_model_spec, registered_models

__all__ = ["FlopCount", "ModelSpec", "ParamReport", "get_model_spec", "register_model_spec", "registered_models"]
