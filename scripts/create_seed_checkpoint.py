#!/usr/bin/env python
"""Write a seed checkpoint: the initial weights of a run, as a DCP ``step-0`` (model only).

One process builds the model of the job config exactly as the trainer resolves
it (flavor + overrides, vocabulary sized to the tokenizer, seeded with
``job.seed``), initialises it on the CPU and saves it into the run's checkpoint
folder ``<job.dump_folder>/<checkpoint.folder>/step-0``. Every launch of the
run (1 process, FSDP over 8 GPUs, HSDP over nodes) then starts from the same
weights: run the trainer with ``--checkpoint.enable true`` and it loads
``step-0`` (the optimizer, schedule and data position start fresh)::

    python scripts/create_seed_checkpoint.py --config train_configs/debug.toml [--section.key value ...]

Refuses to write into a checkpoint folder that already holds checkpoints.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path

import torch

from hydra_titan.components.checkpoint import CheckpointManager, list_checkpoints
from hydra_titan.components.tokenizer import build_tokenizer
from hydra_titan.config import ConfigError, parse_or_exit
from hydra_titan.models import get_model_spec
from hydra_titan.train import resolve_model_args

logger = logging.getLogger("create_seed_checkpoint")


def create_seed_checkpoint(cfg) -> Path:
    """Build + initialise the model of ``cfg`` and save it as ``step-0``; returns the folder written."""
    folder = Path(cfg.job.dump_folder) / cfg.checkpoint.folder
    existing = list_checkpoints(folder) + [(-1, p) for p in sorted(folder.glob("step-*.tmp"))]
    if existing:
        raise FileExistsError(f"{folder} already holds checkpoints ({', '.join(p.name for _, p in existing)}); "
                              "refusing to write a seed checkpoint there")
    torch.manual_seed(cfg.job.seed)
    tokenizer = build_tokenizer(cfg.tokenizer.name)
    spec = get_model_spec(cfg.model.name)
    args = resolve_model_args(spec, cfg, tokenizer)
    with torch.device("meta"):
        model = spec.model_cls(args)
    model.to_empty(device="cpu")
    model.init_weights(buffer_device=torch.device("cpu"))
    ckpt_cfg = dataclasses.replace(cfg.checkpoint, enable=True, async_mode="disabled", keep_latest_k=0)
    manager = CheckpointManager(ckpt_cfg, folder=folder, model=model, model_args=args, model_name=cfg.model.name)
    manager.save(0, reason="seed", model_only=True)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("seed checkpoint of %s/%s (%.2fM parameters, seed %d) written to %s", cfg.model.name,
                cfg.model.flavor, n_params / 1e6, cfg.job.seed, folder / "step-0")
    return folder / "step-0"


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    if argv is None:
        argv = sys.argv[1:]
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        print("Options: --config FILE and any trainer override --section.key VALUE (see `python train.py --help`).")
        return 0
    cfg = parse_or_exit(argv)
    try:
        create_seed_checkpoint(cfg)
    except (ConfigError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
