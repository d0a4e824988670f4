"""torchtitan's checkpoint manager, writing checkpoints hydra_titan's tools can open.

Both projects write DCP folders named ``step-N`` and, thanks to
``HydraTitanModel`` holding the decoder as ``model``, both store the weights
under the same keys (``model.tok_embeddings.weight``, ...). What a torchtitan
checkpoint lacks for hydra_titan is the ``hydra_titan.json`` beside the data
(model family, args, tokenizer: what ``scripts/generate.py``,
``scripts/convert_checkpoint.py`` and ``load_inference_model`` rebuild the
model from) and the ``COMPLETE`` marker that tells a finished save from an
interrupted one. :class:`HydraCheckpointManager` adds both after each save;
the marker once the write is known to be done: at once for synchronous saves
(the final save always is), when torchtitan awaits it for async ones (at the
next save).

The other way round needs no code: torchtitan's
``--checkpoint.initial_load_path <hydra_titan step-N>`` (model only, its
default) reads the ``model.*`` entries of a hydra_titan checkpoint.

The optimizer, lr-scheduler and dataloader entries keep each trainer's own
layout, so a run resumes only under the trainer that wrote it; across
trainers, weights move.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torchtitan.components.checkpoint import AsyncMode, CheckpointManager

from hydra_titan.components.checkpoint_files import COMPLETE_MARKER, FORMAT_VERSION, write_meta

from .model import HydraTitanModel


class HydraCheckpointManager(CheckpointManager):
    @dataclass(kw_only=True, slots=True)
    class Config(CheckpointManager.Config):
        pass

    def __init__(self, config: Config, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        if not self.enable:
            return
        model = kwargs["model_parts"][0]
        if not isinstance(model, HydraTitanModel):
            raise TypeError(f"HydraCheckpointManager records a HydraTitanModel, got {type(model).__name__}")
        self.model_meta = model.checkpoint_meta()
        self.is_writer = not dist.is_initialized() or dist.get_rank() == 0
        self.unmarked: Path | None = None  # an async save in flight: marked complete once it is awaited

    def _save(self, curr_step: int, last_step: bool = False) -> bool:
        saved = super()._save(curr_step, last_step)  # awaits the previous async save first
        if saved and self.is_writer:
            folder = Path(self._create_checkpoint_id(curr_step))
            self._write_meta(folder, curr_step, model_only=last_step and self.last_save_model_only)
            if last_step or self.async_mode == AsyncMode.DISABLED:  # torchtitan writes the final save synchronously
                self._mark_complete(folder)
            else:
                self.unmarked = folder
        return saved

    def _wait_for_saving(self) -> None:
        super()._wait_for_saving()
        if self.is_writer and self.unmarked is not None:
            self._mark_complete(self.unmarked)
            self.unmarked = None

    def _write_meta(self, folder: Path, step: int, *, model_only: bool) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        write_meta(folder, {
            "format_version": FORMAT_VERSION, "step": step, "reason": "torchtitan",
            "contents": ["model"] if model_only else ["model", "optimizer", "lr_scheduler", "dataloader",
                                                      "train_state"],
            **self.model_meta,
            "world_size": dist.get_world_size() if dist.is_initialized() else 1,
            "export_dtype": str(self.export_dtype).removeprefix("torch.") if model_only else None,
            "torch_version": torch.__version__, "writer": "torchtitan (torchtitan_patches)",
        })

    @staticmethod
    def _mark_complete(folder: Path) -> None:
        with open(folder / COMPLETE_MARKER, "w", encoding="utf-8") as f:
            f.write(json.dumps({"completed_at": time.time()}) + "\n")
            f.flush()
            os.fsync(f.fileno())
