"""The non-finite guard: a step whose loss or gradient norm is not finite makes no update.

One NaN or inf in a step would otherwise reach every weight through the optimizer and every later
checkpoint. The guard decides on the device, so a step that is fine waits for nothing:

* the flag "this step is bad" is the rank's loss or the global gradient norm not being finite,
  max-reduced over the ranks (a device all-reduce, like the token count), so all ranks agree;
* torch's fused AdamW takes it as ``found_inf`` (the hook GradScaler uses): its kernel leaves the
  weights, both moments and the step count untouched when the flag is set;
* the counters of skipped steps live on the device and are read at the log step, with its losses.

The lr schedule and the data position move on over a skipped step. They are host-side, and
holding them back would need the flag on the host at every step (a sync); moving on also keeps
step N on the batch and lr an uninterrupted run gives it, and drops the batch that broke the step
instead of feeding it again. An optimizer without ``found_inf`` (``optimizer.fused = false``, the
8-bit AdamW) is guarded by reading the flag on the host each step instead, said once in the log.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..distributed import all_reduce

logger = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """Too many steps in a row had a non-finite loss or gradient norm; the run stops."""


@dataclass
class SkipReport:
    skipped: int      # steps skipped since the previous report
    longest_run: int  # the longest run of consecutive skipped steps since the previous report
    last_step: int    # the last skipped step (0: none yet)


def supports_found_inf(optimizer: torch.optim.Optimizer) -> bool:
    """torch's fused Adam/AdamW read ``optimizer.found_inf`` and skip their update on the device."""
    return isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)) and bool(optimizer.defaults.get("fused"))


class NonFiniteGuard:
    """Takes the optimizer step of the trainer (see the module docstring); `max_in_a_row` is
    `training.max_skipped_steps`."""

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device, max_in_a_row: int):
        self.optimizer = optimizer
        self.max_in_a_row = max_in_a_row
        self.on_device = supports_found_inf(optimizer)
        if not self.on_device:
            logger.warning("the non-finite guard reads each step's finite flag on the host: %s has no fused "
                           "found_inf skip (optimizer.fused = true/auto with adamw has)", type(optimizer).__name__)

        def counter() -> torch.Tensor:
            return torch.zeros(1, dtype=torch.int64, device=device)

        self._skipped = counter()  # skipped steps since the last report
        self._run = counter()      # the current run of consecutive skipped steps
        self._longest = counter()  # the longest run since the last report
        self._last = counter()     # the last skipped step

    def step(self, loss: torch.Tensor, grad_norm: torch.Tensor, step: int) -> None:
        """`optimizer.step()` unless the step is bad; count it if it is."""
        bad = all_reduce((~torch.isfinite(loss.detach().float())).to(torch.int32), "max") > 0
        bad = (bad | ~torch.isfinite(grad_norm.float())).reshape(())
        if self.on_device:
            self.optimizer.found_inf = bad.float()
            self.optimizer.grad_scale = None
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf, self.optimizer.grad_scale
        elif not bool(bad.item()):
            self.optimizer.step()
        bad = bad.to(torch.int64)
        self._skipped += bad
        self._run.mul_(bad).add_(bad)  # consecutive skipped steps so far; 0 after a good one
        torch.maximum(self._longest, self._run, out=self._longest)
        self._last.copy_(torch.where(bad.bool(), step, self._last))

    def report(self) -> SkipReport:
        """Read the counters (one host copy, at a log step) and restart the since-report ones."""
        skipped, longest, last = torch.cat([self._skipped, self._longest, self._last]).tolist()
        self._skipped.zero_()
        self._longest.copy_(self._run)
        return SkipReport(skipped, longest, last)

    def check(self, report: SkipReport) -> None:
        """NonFiniteError when `max_in_a_row` steps in a row were skipped."""
        if report.longest_run >= self.max_in_a_row:
            raise NonFiniteError(
                f"{report.longest_run} steps in a row had a non-finite loss or gradient norm (the last at step "
                f"{report.last_step}); stopping (training.max_skipped_steps = {self.max_in_a_row}). The skipped "
                "steps changed no weight, so the newest checkpoint is good: resume from it with a lower "
                "optimizer.lr, a longer warm-up or a smaller training.max_norm, or look at the data of those steps")
