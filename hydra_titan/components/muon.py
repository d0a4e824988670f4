"""Muon for the hidden matrices, AdamW for everything else, as one optimizer.

``torch.optim.Muon`` orthogonalises the momentum of a 2-D weight (Newton-Schulz)
before applying it; it is only defined for matrices, and by common practice it is
not used for the embedding table or the output head (their rows are per-token
vectors, not a linear map to orthogonalise). So a Muon run needs two torch
optimizers. The trainer, the lr scheduler, the non-finite guard and DCP all take
*one* ``torch.optim.Optimizer``, so ``MuonWithAdamW`` is one: it owns every param
group (each tagged ``"algorithm": "muon" | "adamw"``) and the state, and its
``step`` lends them to a ``torch.optim.Muon`` and a ``torch.optim.AdamW`` that do
the arithmetic. Rebinding on every step (instead of once) keeps this right after
``load_state_dict``, which replaces the group dicts and the state mapping.

Muon's learning rate is adjusted with torch's ``adjust_lr_fn="match_rms_adamw"``
(Moonshot, "Muon is Scalable for LLM Training"): the update's RMS matches
AdamW's, so the lr and weight decay tuned for AdamW are reused unchanged.

Under FSDP2 the parameters are DTensors; Muon's matmuls run on them through
DTensor's sharding propagation (they gather the matrix), which is correct but
not fast: fine for one GPU and for studies, not tuned for many ranks.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

__all__ = ["MUON_ADJUST_LR", "MuonWithAdamW"]

#: torch.optim.Muon's lr adjustment used here: reuse AdamW's lr and weight decay.
MUON_ADJUST_LR = "match_rms_adamw"


class MuonWithAdamW(torch.optim.Optimizer):
    """One optimizer: ``muon_groups`` stepped by torch Muon, ``adamw_groups`` by torch AdamW.

    Each group is a dict with ``params`` and its own ``weight_decay`` (and a ``name``);
    ``lr`` is shared. ``fused`` / ``foreach`` pick the AdamW kernel as in
    ``torch.optim.AdamW``.
    """

    def __init__(self, muon_groups: Iterable[dict[str, Any]], adamw_groups: Iterable[dict[str, Any]], *,
                 lr: float, betas: tuple[float, float], eps: float, momentum: float = 0.95,
                 fused: bool = False, foreach: bool | None = None) -> None:
        muon_groups = [dict(g, algorithm="muon") for g in muon_groups]
        adamw_groups = [dict(g, algorithm="adamw") for g in adamw_groups]
        if not muon_groups:
            raise ValueError("MuonWithAdamW: no 2-D hidden weight for Muon (use optimizer.name = 'adamw')")
        # The two torch optimizers fill their defaults into the group dicts; this optimizer then
        # adopts those same dicts, so the scheduler's lr changes reach both.
        self._muon = torch.optim.Muon(muon_groups, lr=lr, momentum=momentum, nesterov=True,
                                      adjust_lr_fn=MUON_ADJUST_LR)
        self._adamw = (torch.optim.AdamW(adamw_groups, lr=lr, betas=betas, eps=eps, fused=fused or None,
                                         foreach=None if fused else foreach) if adamw_groups else None)
        super().__init__(muon_groups + adamw_groups, defaults={"lr": lr})

    def _lend(self, inner: torch.optim.Optimizer | None, algorithm: str) -> torch.optim.Optimizer | None:
        if inner is not None:
            inner.param_groups = [g for g in self.param_groups if g["algorithm"] == algorithm]
            inner.state = self.state  # disjoint params, so one mapping serves both
        return inner

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - torch.optim.Optimizer.step
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for inner, algorithm in ((self._muon, "muon"), (self._adamw, "adamw")):
            inner = self._lend(inner, algorithm)
            if inner is not None:
                inner.step()
        return loss

    def group_sizes(self) -> Mapping[str, int]:
        """Number of scalar parameters each algorithm steps (for the log and tests)."""
        sizes = {"muon": 0, "adamw": 0}
        for group in self.param_groups:
            sizes[group["algorithm"]] += sum(p.numel() for p in group["params"])
        return sizes
