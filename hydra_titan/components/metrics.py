"""Training metrics: throughput and MFU, memory, TensorBoard scalars and metrics.jsonl.

Only rank 0 writes (unless told otherwise). Values arrive as Python numbers,
read from device tensors on log steps only, so the step loop itself never
synchronises with the host.
"""

from __future__ import annotations

import json
import logging
import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ..models.common.moe import expert_load_summary

logger = logging.getLogger(__name__)

# dense bf16 tensor-core peak (spec sheet), FLOP/s, by a substring of the device name
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "GH200": 989e12, "B200": 2250e12,
                   "A100": 312e12, "A800": 312e12, "L40S": 362e12, "L4": 121e12}


def peak_flops(device: torch.device) -> float | None:
    """Spec-sheet bf16 peak of the device, or None where MFU has no meaning (CPU, unknown GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_FLOPS.items():
        if key in name:
            return value
    logger.warning("no peak FLOP/s known for %s: MFU will not be reported", name)
    return None


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (process RSS)


class Throughput:
    """Tokens per second per device and MFU over the interval since the last reading."""

    def __init__(self, flops_per_token: float, peak: float | None):
        self.flops_per_token = flops_per_token
        self.peak = peak
        self._tokens = 0
        self._start = time.perf_counter()

    def add_tokens(self, n: int) -> None:
        self._tokens += n

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Leave the time spent inside out of the interval (validation is not training)."""
        began = time.perf_counter()
        try:
            yield
        finally:
            self._start += time.perf_counter() - began

    def read(self) -> dict[str, float]:
        now = time.perf_counter()
        tps = self._tokens / max(now - self._start, 1e-9)
        self._tokens, self._start = 0, now
        out = {"tokens_per_sec": tps, "tflops": tps * self.flops_per_token / 1e12}
        if self.peak:
            out["mfu"] = 100.0 * tps * self.flops_per_token / self.peak
        return out


class MetricsLogger:
    """Writes scalars to TensorBoard and one JSON object per log step to metrics.jsonl.

    The files are opened at the first `log`, so a run that fails at start-up leaves none behind.
    """

    def __init__(self, folder: Path, *, enabled: bool, tensorboard: bool, tb_folder: str, rank: int = 0):
        self.enabled = enabled
        self.folder, self.tensorboard, self.tb_folder, self.rank = folder, tensorboard, tb_folder, rank
        self._writer = None
        self._jsonl = None

    def _open(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        # rank 0 writes metrics.jsonl and tb/; other ranks (metrics.rank_0_only = false) their own files
        suffix = "" if self.rank == 0 else f"_rank{self.rank}"
        self._jsonl = open(self.folder / f"metrics{suffix}.jsonl", "a", encoding="utf-8")
        if self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.folder / self.tb_folder /
                                                     (f"rank{self.rank}" if self.rank else "")))

    def log(self, step: int, scalars: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self._jsonl is None:
            self._open()
        if self._writer is not None:
            for key, value in scalars.items():
                self._writer.add_scalar(key, value, step)
        self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self._jsonl.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._jsonl is not None:
            self._jsonl.close()


# expert_load_summary key -> the per-layer scalar's name
_MOE_SUMMARY = {"max_over_min": "moe_load_max_over_min", "entropy": "moe_load_entropy",
                "dead_experts": "moe_dead_experts"}


def moe_load_scalars(outputs: dict[str, torch.Tensor], moe_layer_ids: list[int],
                     per_layer: bool = False) -> dict[str, float]:
    """Expert loads as flat scalars: the worst MoE layer's load max/min, lowest load entropy and most dead
    experts (`moe/*`, every log step) and, with `per_layer`, the same per MoE layer named by its layer id
    (`routing/moe_*/layer_<id>`).

    `outputs["moe_load"]` is the global load [MoE layers, E] (the trainer sums it over the log interval);
    one summary and one host copy serve both.
    """
    if "moe_load" not in outputs or not moe_layer_ids:
        return {}
    summary = expert_load_summary(outputs["moe_load"])
    table = torch.stack([summary[k] for k in _MOE_SUMMARY], dim=1).tolist()  # [layers, 3]
    ratios, entropies, dead = zip(*table)
    scalars = {"moe/load_max_over_min": max(ratios), "moe/load_entropy_min": min(entropies),
               "moe/dead_experts_max": max(dead)}
    if per_layer:
        for layer_id, row in zip(moe_layer_ids, table):
            for name, value in zip(_MOE_SUMMARY.values(), row):
                scalars[f"routing/{name}/layer_{layer_id}"] = value
    return scalars


def routing_scalars(outputs: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per-block MoD selected fraction and MoR depth histogram / mean depth, as flat scalars."""
    scalars: dict[str, float] = {}
    if "mod_selected_frac" in outputs:
        for i, frac in enumerate(outputs["mod_selected_frac"].tolist()):
            scalars[f"routing/mod_selected_frac/block_{i}"] = frac
    if "mor_depth_hist" in outputs:
        hist = outputs["mor_depth_hist"].float()
        depths = torch.arange(hist.shape[-1], device=hist.device, dtype=hist.dtype)
        for i, (row, mean) in enumerate(zip(hist.tolist(), (hist * depths).sum(-1).tolist())):
            scalars[f"routing/mor_mean_depth/block_{i}"] = mean
            for depth, frac in enumerate(row):
                scalars[f"routing/mor_depth_hist/block_{i}/depth_{depth}"] = frac
    return scalars
