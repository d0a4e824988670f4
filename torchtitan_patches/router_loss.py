"""The model's auxiliary losses, as hydra_titan's loss adds them, for torchtitan's trainer.

torchtitan 0.3.0's loss sees only ``(pred, labels)``; hydra_titan's models
also return ``aux_loss`` (router / MoE balance terms, already weighted by the
model's own coefficients) and ``ponder_loss`` (MoR), each a mean over the
micro-batch. hydra_titan's ``LossFn`` adds them token-weighted: a micro-batch
contributes ``weight * term * local_tokens / global_tokens``, so the sum over
micro-batches and data-parallel ranks is the step mean, like the
cross-entropy's ``sum / global_tokens``. :class:`RouterLoss` computes exactly
those contributions; ``HydraTrainer`` adds them to torchtitan's loss.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torchtitan.config import Configurable

from hydra_titan.components.loss import IGNORE_INDEX, count_target_tokens


class RouterLoss(Configurable):
    @dataclass(kw_only=True, slots=True)
    class Config(Configurable.Config):
        aux_loss_weight: float = 1.0
        """multiplier of the model's aux_loss (hydra_titan's training.aux_loss_weight)"""

        ponder_loss_weight: float = 0.0
        """multiplier of the MoR ponder loss (hydra_titan's training.ponder_loss_weight)"""

        def __post_init__(self) -> None:
            for name in ("aux_loss_weight", "ponder_loss_weight"):
                if getattr(self, name) < 0:
                    raise ValueError(f"router_loss.{name} must be >= 0, got {getattr(self, name)}")

    def __init__(self, config: Config) -> None:
        self.weights = {"aux": config.aux_loss_weight, "ponder": config.ponder_loss_weight}

    def __call__(self, outputs: Mapping[str, torch.Tensor], labels: torch.Tensor,
                 global_valid_tokens: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(weighted contribution to add to the loss, unweighted parts {aux, ponder}, both fp32 0-dim)."""
        share = count_target_tokens(labels, IGNORE_INDEX) / global_valid_tokens.clamp_min(1).float()
        parts = {}
        for key, output in (("aux", "aux_loss"), ("ponder", "ponder_loss")):
            value = outputs.get(output)
            parts[key] = share * (value.float().reshape(()) if value is not None else share.new_zeros(()))
        total = share.new_zeros(())
        for key, part in parts.items():
            if self.weights[key] != 0:  # a zero weight adds no backward work
                total = total + self.weights[key] * part
        return total, parts
