"""torchtitan ModelSpecs for hydra_titan's registered models.

torchtitan's ``ModelSpec`` bundles a model config with the callables its
trainer needs. For a hydra_titan family that is our model (behind
torchtitan's protocol), our parallelize function, and nothing else: no
pipelining (hydra_titan's blocks are not split across stages), no HF
state-dict adapter (checkpoints already share hydra_titan's keys), and no
post-optimizer hook (MoE expert biases are moved by ``HydraTrainer``).
"""

from __future__ import annotations

from typing import Any

from torchtitan.protocols.model_spec import ModelSpec

from .model import HydraTitanModel
from .parallelize import parallelize_hydra


def hydra_model_spec(name: str, flavor: str, overrides: dict[str, Any] | None = None,
                     init_mode: str = "full") -> ModelSpec:
    """The ModelSpec of family ``name`` at ``flavor`` (unknown names raise ValueError naming the known ones)."""
    model = HydraTitanModel.Config(name=name, flavor=flavor, overrides=dict(overrides or {}), init_mode=init_mode)
    if flavor not in model.spec.flavors:
        raise ValueError(f"unknown flavor {flavor!r} for model {name!r}; known: {list(model.spec.flavors)}")
    return ModelSpec(name=name, flavor=flavor, model=model, parallelize_fn=parallelize_hydra, pipelining_fn=None,
                     post_optimizer_build_fn=None, state_dict_adapter=None)
