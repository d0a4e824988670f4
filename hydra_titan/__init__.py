"""hydra_titan: a PyTorch-native pretraining stack for HYDRA language models.

The original HYDRA's public API is importable from here, as its README and
seed 004 spell it::

    from hydra_titan import create_ccgqa_mod_mor_model, CCGQAAttention, CCGQABlock

The names are resolved on first use, so importing the package (or its config
module) does not build the model registry.
"""

from __future__ import annotations

__version__ = "0.1.0"

# name -> module of hydra_titan.models that defines it
_PUBLIC_MODEL_API = {
    "create_ccgqa_mod_mor_model": "hydra",
    "CCGQAAttention": "hydra",
    "CCGQABlock": "hydra",
    "CCGQAMoDMoRModel": "hydra",
    "HydraModel": "hydra",
    "HydraModelArgs": "hydra",
    "LlamaModel": "llama",
    "MoE": "common.moe",
    "OrkyHydraWaaaghModel": "waaagh",
}

__all__ = ["__version__", *_PUBLIC_MODEL_API]


def __getattr__(name: str):
    if name not in _PUBLIC_MODEL_API:
        raise AttributeError(f"module 'hydra_titan' has no attribute {name!r}")
    import importlib

    module = importlib.import_module(f".models.{_PUBLIC_MODEL_API[name]}", __name__)
    return getattr(module, name)
