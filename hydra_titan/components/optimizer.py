"""Optimizer construction: AdamW (fused / foreach), torchao's 8-bit AdamW, or Muon.

Parameters are split into two groups, *decay* and *no-decay*. Weight decay
pulls weights towards zero, which is right for the big matrices but harmful
for parameters whose scale carries meaning: norm gains, biases, per-head
temperatures, embeddings and router vectors (decaying a router shrinks its
logits towards the 0.5 threshold and blurs the routing decision). The rule is
"ndim < 2, or the name contains one of ``NO_DECAY_NAME_PATTERNS``"; a model
with other special parameters passes its own ``no_decay_patterns``.

``name = "muon"`` moves the decay group's hidden matrices (the weights of
``nn.Linear`` modules other than the output head) into a third group, "muon",
stepped by ``torch.optim.Muon`` (components/muon.py); the rest stays on AdamW.

Everything here only reads ``name``, ``ndim``, ``numel()``, ``device`` and
``requires_grad`` of the parameters, all of which are DTensor-safe, so the
optimizer can be built after FSDP2 ``fully_shard`` (the way it must be).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from .muon import MUON_ADJUST_LR, MuonWithAdamW

logger = logging.getLogger(__name__)

__all__ = [
    "NO_DECAY_NAME_PATTERNS",
    "OPTIMIZER_NAMES",
    "build_optimizer",
    "build_param_groups",
    "is_no_decay",
]

#: Substrings of a parameter's fully-qualified name that exempt it from weight
#: decay (in addition to every parameter with ndim < 2). Extend with
#: ``build_optimizer(..., no_decay_patterns=NO_DECAY_NAME_PATTERNS + (...,))``.
NO_DECAY_NAME_PATTERNS: tuple[str, ...] = (
    "tok_embeddings",  # token embedding table
    "embedding",  # any other embedding table
    "router",  # MoD / MoR / MoE routers
    "recursion_emb",  # MoR per-step depth embeddings
    "log_beta",  # CCGQA per-KV-head temperature
)

_FUSED_CHOICES = ("auto", "true", "false")


def is_no_decay(
    name: str,
    param: torch.Tensor,
    no_decay_patterns: Sequence[str] = NO_DECAY_NAME_PATTERNS,
) -> bool:
    """True when ``param`` (named ``name``) must not be weight-decayed."""
    return param.ndim < 2 or any(pattern in name for pattern in no_decay_patterns)


def build_param_groups(
    model: nn.Module,
    weight_decay: float,
    no_decay_patterns: Sequence[str] = NO_DECAY_NAME_PATTERNS,
) -> list[dict[str, Any]]:
    """Split the trainable parameters of ``model`` into decay / no-decay groups.

    Returns the non-empty groups (decay first), each a dict with ``params``,
    ``weight_decay`` and a ``name`` ("decay" / "no_decay") that is kept in the
    optimizer's state dict so that a checkpoint shows which group is which.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if is_no_decay(name, param, no_decay_patterns) else decay).append(param)
    if not decay and not no_decay:
        raise ValueError("build_optimizer: the model has no parameter with requires_grad=True")
    groups = [
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]


def muon_matrices(model: nn.Module) -> set[int]:
    """ids of the weights Muon steps: ``nn.Linear`` weights, except the output head's.

    Conv kernels, expert tensors (3-D), embeddings and norms are not linear maps of the
    hidden state; the output head maps to per-token logits. Those stay on AdamW.
    """
    head = getattr(model, "output", None)
    head_ids = {id(p) for p in head.parameters()} if isinstance(head, nn.Module) else set()
    return {id(m.weight) for m in model.modules()
            if isinstance(m, nn.Linear) and m.weight.ndim == 2 and id(m.weight) not in head_ids}


def split_muon_group(model: nn.Module, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Move the decay group's ``muon_matrices`` into a group named "muon" (decayed too)."""
    matrices = muon_matrices(model)
    out: list[dict[str, Any]] = []
    for group in groups:
        if group["name"] != "decay":
            out.append(group)
            continue
        muon = [p for p in group["params"] if id(p) in matrices]
        rest = [p for p in group["params"] if id(p) not in matrices]
        out += [{**group, "name": "muon", "params": muon}, {**group, "params": rest}]
    return [group for group in out if group["params"]]


def _log_groups(optimizer_name: str, groups: Sequence[Mapping[str, Any]], detail: str) -> None:
    """Log, per group, how many tensors and scalar parameters it holds."""
    summary = ", ".join(
        f"{g['name']}: {len(g['params'])} tensors / "
        f"{sum(p.numel() for p in g['params']):,} params (wd={g['weight_decay']})"
        for g in groups
    )
    logger.info("optimizer %s (%s): %s", optimizer_name, detail, summary)


FUSED_DEVICES = ("cuda", "cpu")  # where torch has a fused AdamW kernel


def _all_on_fused_devices(groups: Iterable[Mapping[str, Any]]) -> bool:
    return all(p.device.type in FUSED_DEVICES for g in groups for p in g["params"])


def _use_fused(fused: str, groups: Iterable[Mapping[str, Any]]) -> bool:
    """"true", or "auto" with every parameter on a device that has the fused AdamW kernel."""
    return fused == "true" or (fused == "auto" and _all_on_fused_devices(groups))


def _normalise_fused(fused: str | bool) -> str:
    """Accept "auto" / "true" / "false" (any case) or a bool."""
    if isinstance(fused, bool):
        return "true" if fused else "false"
    value = str(fused).strip().lower()
    if value not in _FUSED_CHOICES:
        raise ValueError(f"fused={fused!r} is not one of {list(_FUSED_CHOICES)} (or a bool)")
    return value


def _build_adamw(groups: list[dict[str, Any]], *, model: nn.Module, lr: float, betas: tuple[float, float],
                 eps: float, fused: str) -> tuple[torch.optim.Optimizer, str]:
    """torch AdamW: the fused kernel on CUDA and CPU ("auto"), foreach elsewhere.

    Fused is the default because its ``found_inf`` input lets the non-finite
    guard (components/step_guard.py) skip a bad step on the device. If torch
    refuses it at construction, fall back to foreach with a warning rather than
    failing the run.
    """
    del model  # the groups say everything AdamW needs
    use_fused = _use_fused(fused, groups)
    if use_fused:
        try:
            return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True), "fused"
        except (RuntimeError, ValueError, TypeError) as err:
            logger.warning("fused AdamW is not available here (%s); falling back to foreach", err)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=True), "foreach"


def _build_adamw8bit(groups: list[dict[str, Any]], *, model: nn.Module, lr: float, betas: tuple[float, float],
                     eps: float, fused: str) -> tuple[torch.optim.Optimizer, str]:
    """torchao's block-wise 8-bit AdamW (optimizer state ~4x smaller).

    ``fused`` does not apply (torchao compiles its own step). torchao keeps the
    state of small tensors (< 4096 elements) in fp32. Its step is built with
    ``torch.compile``: on CPU that needs a working C++ compiler, and it is meant
    for CUDA; CPU support is whatever the installed torchao provides.
    """
    del fused, model
    try:
        from torchao.optim import AdamW8bit
    except ImportError as err:
        raise ImportError(
            "optimizer name 'adamw8bit' needs torchao (torchao.optim.AdamW8bit): "
            "install it with `pip install 'hydra_titan[float8]'` or `pip install torchao`"
        ) from err
    try:
        optimizer = AdamW8bit(groups, lr=lr, betas=betas, eps=eps)
    except (RuntimeError, NotImplementedError) as err:
        devices = sorted({p.device.type for g in groups for p in g["params"]})
        raise RuntimeError(
            f"torchao AdamW8bit could not be built for parameters on {devices}: {err}. "
            "Use name='adamw' on this device."
        ) from err
    return optimizer, "torchao 8-bit state"


def _build_muon(groups: list[dict[str, Any]], *, model: nn.Module, lr: float, betas: tuple[float, float],
                eps: float, fused: str) -> tuple[torch.optim.Optimizer, str]:
    """torch Muon on the model's hidden matrices, torch AdamW (fused as for "adamw") on the rest."""
    groups = split_muon_group(model, groups)
    muon = [g for g in groups if g["name"] == "muon"]
    adamw = [g for g in groups if g["name"] != "muon"]
    use_fused = _use_fused(fused, adamw)
    optimizer = MuonWithAdamW(muon, adamw, lr=lr, betas=betas, eps=eps, fused=use_fused, foreach=not use_fused)
    return optimizer, f"torch Muon (adjust_lr_fn={MUON_ADJUST_LR}) + {'fused' if use_fused else 'foreach'} AdamW"


#: (groups, *, model, lr, betas, eps, fused) -> (optimizer, a few words on how it was built, for the log)
OptimizerBuilder = Callable[..., tuple[torch.optim.Optimizer, str]]

_OPTIMIZER_BUILDERS: Mapping[str, OptimizerBuilder] = MappingProxyType(
    {
        "adamw": _build_adamw,
        "adamw8bit": _build_adamw8bit,
        "muon": _build_muon,
    }
)

#: The names ``build_optimizer`` accepts.
OPTIMIZER_NAMES: tuple[str, ...] = tuple(_OPTIMIZER_BUILDERS)


def build_optimizer(
    model: nn.Module,
    *,
    name: str = "adamw",
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    fused: str | bool = "auto",
    no_decay_patterns: Sequence[str] = NO_DECAY_NAME_PATTERNS,
) -> torch.optim.Optimizer:
    """Build the optimizer for ``model`` (call it after parallelisation).

    Args:
        model: the (possibly FSDP2-sharded, compiled) model.
        name: one of ``OPTIMIZER_NAMES``.
        lr, beta1, beta2, eps: AdamW hyper-parameters (``lr`` is the peak lr;
            the scheduler multiplies it).
        weight_decay: decoupled weight decay of the *decay* group; the
            *no-decay* group always gets 0.
        fused: "auto" (fused kernel when every parameter is on CUDA or CPU,
            foreach otherwise), "true" or "false".
        no_decay_patterns: name substrings exempt from decay (see
            ``NO_DECAY_NAME_PATTERNS``).
    """
    if name not in _OPTIMIZER_BUILDERS:
        raise ValueError(f"unknown optimizer name {name!r}; known: {sorted(_OPTIMIZER_BUILDERS)}")
    if lr < 0:
        raise ValueError(f"lr must be >= 0, got {lr}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    fused_choice = _normalise_fused(fused)
    groups = build_param_groups(model, weight_decay, no_decay_patterns)
    optimizer, detail = _OPTIMIZER_BUILDERS[name](groups, model=model, lr=lr, betas=(beta1, beta2), eps=eps,
                                                  fused=fused_choice)
    _log_groups(name, optimizer.param_groups, detail)
    return optimizer
