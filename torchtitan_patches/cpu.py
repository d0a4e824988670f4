"""Run torchtitan 0.3.0 on a host without an accelerator.

torchtitan picks its device once, at import: ``tools.utils`` sets
``device_type = "cuda"`` when torch finds no accelerator, and five modules
copy that name and ``device_module`` (``torch.cuda``) into their own globals.
On a CPU-only torch every later call (``torch.cuda.set_device``, the memory
monitor's ``get_device_properties``, ...) then fails. torchtitan has no switch
for this, so :func:`use_cpu_if_no_accelerator` points those globals at
``"cpu"`` and at :class:`CpuDeviceModule`, a stand-in that answers the few
calls torchtitan makes (one device, no memory statistics). Process groups then
use gloo (torch's default backend for ``"cpu"``) and CUDA-graph capture falls
back to eager by torchtitan's own check.

This is the bridge's one patch of torchtitan state. It is applied by the
trainer (``HydraTrainer``) before torchtitan's ``Trainer.__init__`` reads the
device, only when no accelerator is present, and is idempotent.
"""

from __future__ import annotations

import importlib
import logging
import os
from types import SimpleNamespace

import torch

logger = logging.getLogger(__name__)

# every torchtitan 0.3.0 module that binds `device_type` / `device_module` at import
# (grep "import.*device_type\|import.*device_module" in its source)
PATCHED_MODULES = (
    "torchtitan.tools.utils",
    "torchtitan.components.metrics",
    "torchtitan.distributed.parallel_dims",
    "torchtitan.distributed.utils",
    "torchtitan.models.common.token_dispatcher",
    "torchtitan.tools.profiler",
)


class CpuDeviceModule:
    """The subset of ``torch.cuda``'s interface that torchtitan's trainer calls, for the CPU.

    One device (index 0); memory statistics are empty, so torchtitan logs its peak-memory
    figures as negative "unknown" values rather than failing.
    """

    @staticmethod
    def device_count() -> int:
        return 1

    @staticmethod
    def current_device() -> int:
        return 0

    @staticmethod
    def set_device(device: torch.device | int | str) -> None:
        del device  # one CPU device: nothing to select

    @staticmethod
    def synchronize(device: torch.device | int | str | None = None) -> None:
        del device  # CPU kernels run synchronously

    @staticmethod
    def get_device_name(device: torch.device | int | str | None = None) -> str:
        del device
        return "cpu"

    @staticmethod
    def get_device_properties(device: torch.device | int | str | None = None) -> SimpleNamespace:
        del device
        return SimpleNamespace(name="cpu", total_memory=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))

    @staticmethod
    def memory_stats(device: torch.device | int | str | None = None) -> dict[str, int]:
        del device
        return {}

    @staticmethod
    def reset_peak_memory_stats(device: torch.device | int | str | None = None) -> None:
        del device

    @staticmethod
    def empty_cache() -> None:
        pass


def has_accelerator() -> bool:
    """Does torch see an accelerator (CUDA, XPU, ...)? torchtitan's own device choice asks the same."""
    return torch.accelerator.is_available()


def use_cpu_if_no_accelerator() -> bool:
    """Point torchtitan's device globals at the CPU when there is no accelerator; True if it did.

    A no-op (False) on an accelerator host, where torchtitan's own choice stands.
    """
    if has_accelerator():
        return False
    cpu = CpuDeviceModule()
    for name in PATCHED_MODULES:
        module = importlib.import_module(name)
        if hasattr(module, "device_type"):
            module.device_type = "cpu"
        if hasattr(module, "device_module"):
            module.device_module = cpu
    logger.info("no accelerator: torchtitan runs on the CPU (gloo process groups, eager steps)")
    return True
