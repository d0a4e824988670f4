#!/usr/bin/env python
"""Convert hydra_titan checkpoints between DCP and single-file formats (one process, CPU).

Subcommands::

    dcp-to-torch        DCP folder -> one torch.save file (the whole state: model, optimizer, ...)
    torch-to-dcp        torch.save file (as written by dcp-to-torch) -> DCP folder
    dcp-to-safetensors  DCP folder -> model.safetensors (model weights only) + config.json

A DCP input is a checkpoint folder (``step-N/``) or a checkpoint root holding
``step-N/`` folders (the newest complete one is used). Outputs are never
overwritten. Examples::

    python scripts/convert_checkpoint.py dcp-to-torch outputs/debug/checkpoint/step-150 ckpt.pt
    python scripts/convert_checkpoint.py torch-to-dcp ckpt.pt outputs/new/checkpoint/step-150
    python scripts/convert_checkpoint.py dcp-to-safetensors outputs/debug/checkpoint export/ --dtype bfloat16

A folder written by torch-to-dcp into a run's checkpoint folder (as ``step-N``)
is resumed by the trainer like any other checkpoint, on any number of ranks.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from hydra_titan.components.checkpoint import (DTYPES, META_FILE, CheckpointError, checkpoint_problem,
                                               load_model_weights, publish_checkpoint, read_meta,
                                               resolve_checkpoint_dir, single_process_quiet)
from hydra_titan.components.checkpoint_files import TORCH_FILE_META_KEY

logger = logging.getLogger("convert_checkpoint")

META_KEY = TORCH_FILE_META_KEY  # the checkpoint's hydra_titan.json, carried inside a torch.save file


class ConversionError(Exception):
    pass


def _dcp_input(path: str) -> Path:
    try:
        src = resolve_checkpoint_dir(path)
    except FileNotFoundError as e:
        raise ConversionError(str(e)) from None
    problem = checkpoint_problem(src, require_marker=False)
    if problem is not None:
        raise ConversionError(f"{src} is not a usable DCP checkpoint: {problem}")
    return src


def _new_output(path: str) -> Path:
    out = Path(path)
    if out.exists():
        raise ConversionError(f"{out} already exists; refusing to overwrite it")
    return out


def _read_full_dcp(src: Path) -> dict:
    """Every entry of a DCP checkpoint as plain (full) tensors and objects."""
    try:  # the planner that format_utils.dcp_to_torch_save uses (present in torch 2.11 .. 2.13)
        from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict
    except ImportError:  # pragma: no cover - fall back to the public converter and read its output back
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        tmp = src.parent / f".{src.name}.convert.pt"
        dcp_to_torch_save(src, tmp)
        try:
            return torch.load(tmp, weights_only=False)
        finally:
            tmp.unlink(missing_ok=True)
    state: dict = {}
    with single_process_quiet():
        _load_state_dict(state, storage_reader=dcp.FileSystemReader(str(src)),
                         planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    return state


def dcp_to_torch(args: argparse.Namespace) -> None:
    src, out = _dcp_input(args.input), _new_output(args.output)
    state = _read_full_dcp(src)
    meta = read_meta(src)
    if meta is not None:
        state[META_KEY] = meta
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(state, tmp)
    tmp.rename(out)
    logger.info("wrote %s (%s) from %s", out, ", ".join(sorted(k for k in state if k != META_KEY)), src)


def torch_to_dcp(args: argparse.Namespace) -> None:
    src = Path(args.input)
    if not src.is_file():
        raise ConversionError(f"input file {src} does not exist")
    out = _new_output(args.output)
    state = torch.load(src, map_location="cpu", weights_only=False)
    if not isinstance(state, dict):
        raise ConversionError(f"{src} does not hold a state dict (got {type(state).__name__})")
    meta = state.pop(META_KEY, None)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with single_process_quiet():
        dcp.save(state, checkpoint_id=str(tmp), no_dist=True)
    if meta is not None:
        meta = {**meta, "converted_from": str(src)}
    publish_checkpoint(tmp, out, meta)
    logger.info("wrote DCP checkpoint %s (%s) from %s", out, ", ".join(sorted(state)), src)


def dcp_to_safetensors(args: argparse.Namespace) -> None:
    from safetensors.torch import save_file

    src, out = _dcp_input(args.input), _new_output(args.output)
    dtype = None if args.dtype == "keep" else DTYPES[args.dtype]
    weights = {k: v.contiguous() for k, v in load_model_weights(src, dtype).items()}
    meta = read_meta(src) or {}
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    dtypes = sorted({str(v.dtype).replace("torch.", "") for v in weights.values()})
    config = {"model_name": meta.get("model_name"), "model_args": meta.get("model_args"),
              "tokenizer": meta.get("tokenizer"),
              "dtype": dtypes[0] if len(dtypes) == 1 else dtypes, "step": meta.get("step"), "source": str(src),
              "num_parameters": sum(v.numel() for v in weights.values())}
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    tmp.rename(out)
    if not meta:
        logger.warning("%s has no %s: config.json lacks the model name and args", src, META_FILE)
    logger.info("wrote %s/model.safetensors (%d tensors, %s) and config.json", out, len(weights), config["dtype"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("dcp-to-torch", help="DCP folder -> one torch.save file (whole state)",
                       description="Gather a DCP checkpoint (any number of ranks) into one torch.save file holding "
                                   "the whole state (model, optimizer, lr_scheduler, dataloader, train_state, rng) "
                                   f"and the checkpoint's {META_FILE} under the key {META_KEY!r}.")
    p.add_argument("input", help="DCP checkpoint folder (step-N) or a folder of step-N checkpoints (newest used)")
    p.add_argument("output", help="torch.save file to write (must not exist)")
    p.set_defaults(func=dcp_to_torch)
    p = sub.add_parser("torch-to-dcp", help="torch.save file -> DCP folder",
                       description="Write a torch.save state dict (e.g. from dcp-to-torch) as a DCP checkpoint "
                                   "folder, with its completion marker, loadable by any data-parallel layout. Name "
                                   "the output <dump_folder>/<checkpoint.folder>/step-N to resume a run from it.")
    p.add_argument("input", help="torch.save file")
    p.add_argument("output", help="DCP folder to create (must not exist)")
    p.set_defaults(func=torch_to_dcp)
    p = sub.add_parser("dcp-to-safetensors", help="DCP folder -> model.safetensors + config.json (weights only)",
                       description="Export the model weights of a DCP checkpoint to OUTPUT/model.safetensors, keyed "
                                   "by the single-device model's parameter names (_orig_mod / "
                                   "_checkpoint_wrapped_module removed), with OUTPUT/config.json giving the model "
                                   "name and args. Load with safetensors.torch.load_file.")
    p.add_argument("input", help="DCP checkpoint folder (step-N) or a folder of step-N checkpoints (newest used)")
    p.add_argument("output", help="folder to create (must not exist)")
    p.add_argument("--dtype", choices=["keep", *DTYPES], default="keep",
                   help="dtype of the floating-point weights (default: keep the saved dtype)")
    p.set_defaults(func=dcp_to_safetensors)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ConversionError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
