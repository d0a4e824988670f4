"""Fault injection for tests: kill a rank, poison a loss or fill the disk at a named point of a step.

The fault tests (tests/integration/test_faults.py) need real failures at exact moments: a rank
SIGKILLed in the middle of a step or of a checkpoint write, a NaN loss, a save that finds the disk
full. They are asked for in the ``[debug]`` config section, off by default::

    --debug.faults kill_mid_step@5:rank1,nan_loss@3x2

A fault is ``POINT@STEP[xCOUNT][:rankR]``: at step STEP (and the COUNT - 1 steps after it) on rank R
(every rank when left out). The points:

==================  =======================================================================
kill_mid_step       SIGKILL after the backward of the step, before the optimizer update
kill_mid_save       SIGKILL inside the DCP write of step STEP's checkpoint (sync or async)
kill_after_publish  SIGKILL just after step STEP's checkpoint was published (rank 0 renames)
nan_loss            the step's loss is multiplied by NaN (so are its gradients)
enospc_save         the DCP write of step STEP's checkpoint fails with ENOSPC (disk full)
==================  =======================================================================

A fault fires once per dump folder: before firing, the rank writes ``faults/<fault>[.rankR].fired``
there, so a run restarted by ``torchrun --max-restarts`` (same config) goes on past the point.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from torch.distributed.checkpoint import FileSystemWriter
from torch.futures import Future

logger = logging.getLogger(__name__)

POINTS = ("kill_mid_step", "kill_mid_save", "kill_after_publish", "nan_loss", "enospc_save")
_SPEC = re.compile(r"^(?P<point>[a-z_]+)@(?P<step>\d+)(?:x(?P<count>\d+))?(?::rank(?P<rank>\d+))?$")


@dataclass(frozen=True)
class Fault:
    point: str
    step: int
    count: int = 1
    rank: int | None = None  # None: every rank

    @property
    def name(self) -> str:
        count = f"x{self.count}" if self.count != 1 else ""
        rank = f":rank{self.rank}" if self.rank is not None else ""
        return f"{self.point}@{self.step}{count}{rank}"

    def covers(self, point: str, step: int, rank: int) -> bool:
        return (self.point == point and self.step <= step < self.step + self.count
                and (self.rank is None or self.rank == rank))


def parse_fault(spec: str) -> Fault:
    """``POINT@STEP[xCOUNT][:rankR]`` -> Fault; ValueError naming the problem."""
    m = _SPEC.match(spec.strip())
    if m is None:
        raise ValueError(f"debug.faults: {spec!r} is not POINT@STEP[xCOUNT][:rankR] (e.g. kill_mid_step@5:rank1)")
    if m["point"] not in POINTS:
        raise ValueError(f"debug.faults: unknown point {m['point']!r} in {spec!r}; known: {', '.join(POINTS)}")
    fault = Fault(m["point"], int(m["step"]), int(m["count"] or 1), None if m["rank"] is None else int(m["rank"]))
    if fault.step < 1 or fault.count < 1:
        raise ValueError(f"debug.faults: {spec!r} needs STEP >= 1 and COUNT >= 1")
    return fault


class FaultInjector:
    """The faults of one rank of one run. With none configured every method is a no-op."""

    def __init__(self, specs: list[str], *, rank: int, folder: str | os.PathLike):
        self.faults = [parse_fault(s) for s in specs]
        self.rank = rank
        self.marker_dir = Path(folder) / "faults"
        if self.faults:
            logger.warning("fault injection is on (debug.faults): %s", ", ".join(f.name for f in self.faults))

    def __bool__(self) -> bool:
        return bool(self.faults)

    def _armed(self, point: str, step: int) -> Fault | None:
        for fault in self.faults:
            if fault.covers(point, step, self.rank) and not self._marker(fault).exists():
                return fault
        return None

    def _marker(self, fault: Fault) -> Path:
        name = fault.name.replace(":", ".") if fault.rank is not None else f"{fault.name}.rank{self.rank}"
        return self.marker_dir / f"{name}.fired"

    def _fire(self, fault: Fault, step: int, what: str) -> None:
        """Record the fault (it fires once per dump folder) and say so; the last step of a COUNT > 1
        fault writes the marker, so a run that dies in between sees the remaining steps again."""
        if step == fault.step + fault.count - 1:
            self.marker_dir.mkdir(parents=True, exist_ok=True)
            with open(self._marker(fault), "w", encoding="utf-8") as f:
                f.write(f"step {step}\n")
                f.flush()
                os.fsync(f.fileno())
        logger.warning("fault injection %s: %s at step %d on rank %d", fault.name, what, step, self.rank)

    def kill(self, point: str, step: int) -> None:
        """SIGKILL this process if a kill fault covers (point, step): no handler, no cleanup, no flush
        beyond the log line, like a node losing power."""
        fault = self._armed(point, step)
        if fault is None:
            return
        self._fire(fault, step, "SIGKILL")
        for handler in logging.getLogger().handlers:
            handler.flush()
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    def poison_loss(self, step: int) -> bool:
        """True if this step's loss is to be made NaN."""
        fault = self._armed("nan_loss", step)
        if fault is not None:
            self._fire(fault, step, "the loss is NaN")
        return fault is not None

    def storage_writer(self, path: str | os.PathLike, step: int) -> FileSystemWriter | None:
        """A DCP writer that fails the way a fault asks while writing step `step`, or None."""
        if self._armed("kill_mid_save", step) is None and self._armed("enospc_save", step) is None:
            return None
        return _FaultyWriter(path, injector=self, step=step)


class _FaultyWriter(FileSystemWriter):
    """FileSystemWriter whose ``write_data`` raises ENOSPC before writing, or SIGKILLs the process
    after this rank's data file is written but before DCP writes the ``.metadata`` (the middle of a
    save). In an async save this runs on DCP's background thread, mid-save for the training loop."""

    def __init__(self, path, *, injector: FaultInjector, step: int):
        super().__init__(path)
        self._injector, self._step = injector, step

    def write_data(self, plan, planner) -> Future:
        fault = self._injector._armed("enospc_save", self._step)
        if fault is not None:
            self._injector._fire(fault, self._step, "the checkpoint write fails with ENOSPC")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
        written = super().write_data(plan, planner)
        written.wait()  # this rank's data file is on disk
        self._injector.kill("kill_mid_save", self._step)
        return written
