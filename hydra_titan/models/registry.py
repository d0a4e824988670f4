"""Model specs, registered by name (torchtitan's TrainSpec idea, model half).

A ModelSpec tells the rest of the stack everything it needs about a model
family without an if-chain on its name: how to build it from one of its
flavors, how many FLOPs a training token costs, how to count its parameters,
and which options the shared parallelize function should use for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn


@dataclass(frozen=True)
class FlopCount:
    """Training FLOPs per token (forward + backward)."""

    executed: float  # what the step runs, with routing capacities applied
    dense: float     # the same model with every capacity at 1 (MFU's "dense-equivalent")


@dataclass(frozen=True)
class ParamReport:
    total: int
    non_embedding: int  # total minus the input embedding table
    active: float       # parameters applied per token (each recursion counted, capacities applied, LM head in)

    @classmethod
    def count(cls, model: nn.Module, active: float) -> "ParamReport":
        """Totals read off `model` (a decoder, any device, meta included); `active` from the family's arithmetic."""
        total = sum(p.numel() for p in model.parameters())
        return cls(total=total, non_embedding=total - model.tok_embeddings.weight.numel(), active=active)


@dataclass(frozen=True)
class ParallelizeOptions:
    """Per-model knobs for the shared parallelize function (DESIGN §1, §5)."""

    # fully-qualified-name fragments of linears that float8 must leave alone: the LM head, and every
    # router (MoD/MoR scalars, MoE [E, dim]): tiny, and their scores drive top-k, so high precision
    float8_skip_fqns: tuple[str, ...] = ("output", "router")
    # extra ops for selective activation checkpointing to save (besides matmuls and attention)
    ac_extra_save_ops: tuple[Any, ...] = ()


@dataclass(frozen=True)
class ModelSpec:
    name: str
    model_cls: type[nn.Module]
    args_cls: type
    flavors: dict[str, Any]
    flops_per_token: Callable[[Any, int], FlopCount]
    active_params: Callable[[Any, int], float]  # (args, seq_len) -> ParamReport.active
    parallelize_options: ParallelizeOptions = field(default_factory=ParallelizeOptions)
    # None: the shared `hydra_titan.distributed.parallelize` (every model keeps the decoder contract)
    parallelize_fn: Callable[..., nn.Module] | None = None
    description: str = ""
    variants: dict[str, str] = field(default_factory=dict)  # args.variant values -> one line each
    default_config: str = ""  # the train_configs/ file `--list` points at

    def args(self, flavor: str, **overrides: Any) -> Any:
        """The flavor's args with overrides applied (unknown flavor or field -> ValueError)."""
        if flavor not in self.flavors:
            raise ValueError(f"unknown flavor {flavor!r} for model {self.name!r}; known: {list(self.flavors)}")
        base = self.flavors[flavor]
        return base.replace(**overrides)  # always a copy: the flavor table is never mutated

    def build(self, flavor: str, **overrides: Any) -> nn.Module:
        return self.model_cls(self.args(flavor, **overrides))

    def param_report(self, args: Any, seq_len: int = 2048, model: nn.Module | None = None) -> ParamReport:
        """Parameter counts of the model `args` describe; pass `model` when one is built already."""
        if model is None:
            with torch.device("meta"):
                model = self.model_cls(args)
        return ParamReport.count(model, self.active_params(args, seq_len))


_REGISTRY: dict[str, ModelSpec] = {}


def register_model_spec(spec: ModelSpec) -> ModelSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"model spec {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def get_model_spec(name: str) -> ModelSpec:
    # the built-in families are registered by importing hydra_titan.models (which this module is part of)
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; registered: {sorted(_REGISTRY)}") from None


def registered_models() -> list[str]:
    return sorted(_REGISTRY)


def format_model_list() -> str:
    """The `python train.py --list` text: every model, its variants and flavors, and its default config."""
    lines = []
    for name in registered_models():
        spec = _REGISTRY[name]
        lines.append(f"{name}: {spec.description}" if spec.description else name)
        for variant, text in spec.variants.items():
            lines.append(f"  variant {variant}: {text}")
        lines.append(f"  flavors: {', '.join(spec.flavors)}")
        if spec.default_config:
            lines.append(f"  default config: {spec.default_config}")
    return "\n".join(lines) + "\n"
