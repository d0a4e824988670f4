"""Learning-rate schedules: linear warmup, then cosine / linear / WSD / constant.

The schedule is a pure function ``lr_multiplier(step, ...)`` (a multiplier of
each group's base lr) wrapped in a ``LambdaLR`` so that its position
(``last_epoch``) is part of ``state_dict()`` and a resumed run continues the
same sequence. The lambda is a ``functools.partial`` of a module function, so
the state dict holds only the step count, never the schedule's arguments: the
schedule always comes from the job config.

Step convention: ``LambdaLR`` evaluates the multiplier at ``last_epoch``,
which is 0 at construction and goes up by one at each ``scheduler.step()``
(called after each ``optimizer.step()``). So training step ``i`` (0-based)
runs with ``lr_multiplier(i)``:

* warmup, ``i < warmup_steps``: ``(i + 1) / (warmup_steps + 1)`` (never exactly
  0, so step 0 already learns; torchtitan's choice);
* from ``i = warmup_steps`` the decay shape, starting at 1 and reaching
  ``min_lr_factor`` at ``i = total_steps`` (held there afterwards):

  - ``cosine``: ``min + (1 - min) * (1 + cos(pi * p)) / 2`` with ``p`` the
    fraction of ``[warmup_steps, total_steps]`` done;
  - ``linear``: ``min + (1 - min) * (1 - p)``;
  - ``wsd`` (warmup-stable-decay): 1 until the last
    ``round(decay_ratio * total_steps)`` steps, then linear to ``min``;
  - ``constant``: 1 (``min_lr_factor`` and ``decay_ratio`` unused).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Mapping
from types import MappingProxyType

import torch
from torch.optim.lr_scheduler import LambdaLR

logger = logging.getLogger(__name__)

__all__ = ["DECAY_TYPES", "build_lr_scheduler", "lr_multiplier", "validate_schedule"]


def _fraction_done(step: int, start: int, end: int) -> float:
    """How far ``step`` is through ``[start, end]``, clamped to [0, 1]."""
    if end <= start:
        return 1.0 if step >= end else 0.0
    return min(max((step - start) / (end - start), 0.0), 1.0)


def _wsd_decay_steps(decay_ratio: float, total_steps: int) -> int:
    """Length of WSD's final decay phase (round, not floor: 0.29 * 100 -> 29)."""
    return round(decay_ratio * total_steps)


# Each decay function returns the *remaining* fraction r in [0, 1] of the way
# from min_lr_factor to 1 (the multiplier is min + (1 - min) * r). They are
# only called for steps >= warmup_steps.
DecayFn = Callable[[int, int, int, float], float]


def _cosine(step: int, warmup_steps: int, total_steps: int, decay_ratio: float) -> float:
    progress = _fraction_done(step, warmup_steps, total_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _linear(step: int, warmup_steps: int, total_steps: int, decay_ratio: float) -> float:
    return 1.0 - _fraction_done(step, warmup_steps, total_steps)


def _wsd(step: int, warmup_steps: int, total_steps: int, decay_ratio: float) -> float:
    decay_start = total_steps - _wsd_decay_steps(decay_ratio, total_steps)
    if decay_start >= total_steps:  # no decay phase at all: warmup-stable
        return 1.0
    return 1.0 - _fraction_done(step, decay_start, total_steps)


def _constant(step: int, warmup_steps: int, total_steps: int, decay_ratio: float) -> float:
    return 1.0


_DECAY_FNS: Mapping[str, DecayFn] = MappingProxyType(
    {"cosine": _cosine, "linear": _linear, "wsd": _wsd, "constant": _constant}
)

#: The accepted ``decay_type`` names.
DECAY_TYPES: tuple[str, ...] = tuple(_DECAY_FNS)


def validate_schedule(
    *,
    warmup_steps: int,
    decay_type: str,
    decay_ratio: float,
    min_lr_factor: float,
    total_steps: int,
) -> None:
    """Raise ValueError, naming the argument, for an impossible schedule."""
    if decay_type not in _DECAY_FNS:
        raise ValueError(f"unknown decay_type {decay_type!r}; known: {sorted(_DECAY_FNS)}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if warmup_steps > total_steps:
        raise ValueError(f"warmup_steps ({warmup_steps}) must be <= total_steps ({total_steps})")
    if not 0.0 <= min_lr_factor <= 1.0:
        raise ValueError(f"min_lr_factor must be in [0, 1], got {min_lr_factor}")
    if not 0.0 <= decay_ratio <= 1.0:
        raise ValueError(f"decay_ratio must be in [0, 1], got {decay_ratio}")
    if decay_type == "wsd":
        decay_steps = _wsd_decay_steps(decay_ratio, total_steps)
        if warmup_steps + decay_steps > total_steps:
            raise ValueError(
                f"decay_ratio={decay_ratio} gives {decay_steps} decay steps, which overlap "
                f"warmup_steps={warmup_steps} within total_steps={total_steps}"
            )


def lr_multiplier(
    step: int,
    *,
    warmup_steps: int,
    decay_type: str,
    decay_ratio: float,
    min_lr_factor: float,
    total_steps: int,
) -> float:
    """Multiplier of the base lr at 0-based training step ``step``.

    Pure function of its arguments (see the module docstring for the shapes);
    ``build_lr_scheduler`` validates the arguments once.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    remaining = _DECAY_FNS[decay_type](step, warmup_steps, total_steps, decay_ratio)
    return min_lr_factor + (1.0 - min_lr_factor) * remaining


def fit_warmup(warmup_steps: int, *, decay_type: str, decay_ratio: float, total_steps: int) -> int:
    """The longest warmup, at most ``warmup_steps``, that fits a run of ``total_steps``.

    A short smoke run of a long config (``--training.steps 20`` on a 2000-step
    warmup) warms up over what the decay phase leaves free instead of failing.
    """
    decay_steps = _wsd_decay_steps(decay_ratio, total_steps) if decay_type == "wsd" else 0
    return max(0, min(warmup_steps, total_steps - decay_steps))


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    warmup_steps: int,
    decay_type: str,
    decay_ratio: float,
    min_lr_factor: float,
    total_steps: int,
) -> LambdaLR:
    """A ``LambdaLR`` over every param group following ``lr_multiplier``.

    Call ``scheduler.step()`` once after every ``optimizer.step()``.
    """
    schedule = dict(
        warmup_steps=warmup_steps,
        decay_type=decay_type,
        decay_ratio=decay_ratio,
        min_lr_factor=min_lr_factor,
        total_steps=total_steps,
    )
    validate_schedule(**schedule)
    logger.info("lr schedule: %s", ", ".join(f"{k}={v}" for k, v in schedule.items()))
    return LambdaLR(optimizer, lr_lambda=functools.partial(lr_multiplier, **schedule))
