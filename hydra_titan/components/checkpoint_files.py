"""The on-disk format of hydra_titan checkpoints: folders, markers, metadata, model weights.

Shared by the checkpoint manager (checkpoint.py) and the conversion and
seed-checkpoint scripts, which work on checkpoints without a training run.
See checkpoint.py for the folder layout and the publication protocol.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

COMPLETE_MARKER = "COMPLETE"
META_FILE = "hydra_titan.json"
FORMAT_VERSION = 1
STATE_KEYS = ("model", "optimizer", "lr_scheduler", "dataloader", "train_state", "rng")
EXCLUDABLE = STATE_KEYS[1:]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
STEP_DIR_RE = re.compile(r"^step-(\d+)$")
TMP_DIR_RE = re.compile(r"^step-(\d+)\.tmp$")
_WRAPPER_PARTS = ("_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used by this run; the message says which and why."""


# --------------------------------------------------------------------------- folder helpers


def list_checkpoints(folder: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``step-N`` folder (complete or not), oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := STEP_DIR_RE.match(p.name))]
    return sorted(found)


def read_meta(path: str | os.PathLike) -> dict[str, Any] | None:
    """The ``hydra_titan.json`` beside a checkpoint, or None if it has none."""
    file = Path(path) / META_FILE
    if not file.is_file():
        return None
    return json.loads(file.read_text(encoding="utf-8"))


def write_meta(path: str | os.PathLike, meta: dict[str, Any]) -> None:
    (Path(path) / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")


@contextmanager
def single_process_quiet():
    """DCP warns on every single-process (no_dist) call that it assumes a single process: it is on purpose."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.distributed is .*assuming the intent")
        yield


def dcp_metadata(path: Path):
    return FileSystemReader(str(path)).read_metadata()


def checkpoint_problem(path: str | os.PathLike, *, require_marker: bool = True) -> str | None:
    """Why ``path`` is not a loadable checkpoint, or None if it looks complete.

    Checks the completion marker, that DCP's ``.metadata`` unpickles, and that
    every data file it points to exists and is at least as long as the bytes
    recorded for it (a truncated shard is caught here, before any read).
    """
    path = Path(path)
    if not path.is_dir():
        return "no such folder"
    if require_marker and not (path / COMPLETE_MARKER).is_file():
        return f"no {COMPLETE_MARKER} marker (the save did not finish)"
    if not (path / ".metadata").is_file():
        return "no DCP .metadata file"
    try:
        md = dcp_metadata(path)
    except Exception as e:  # noqa: BLE001 - any unreadable metadata means an unusable checkpoint
        return f"unreadable .metadata ({type(e).__name__}: {e})"
    needed: dict[str, int] = {}
    for info in (getattr(md, "storage_data", None) or {}).values():
        rel, offset, length = (getattr(info, a, None) for a in ("relative_path", "offset", "length"))
        if rel is not None and offset is not None and length is not None:
            needed[rel] = max(needed.get(rel, 0), int(offset) + int(length))
    for rel, size in sorted(needed.items()):
        file = path / rel
        if not file.is_file():
            return f"data file {rel} is missing"
        if file.stat().st_size < size:
            return f"data file {rel} is truncated ({file.stat().st_size} of {size} bytes)"
    return None


def resolve_checkpoint_dir(path: str | os.PathLike) -> Path:
    """A DCP checkpoint folder, given it or a folder of ``step-N`` checkpoints (newest complete one)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path {path} does not exist")
    if (path / ".metadata").is_file():
        return path
    # newest first, stopping at the first complete one: older checkpoints are never opened
    newest = next((p for _, p in reversed(list_checkpoints(path)) if checkpoint_problem(p) is None), None)
    if newest is not None:
        return newest
    raise FileNotFoundError(f"{path} is neither a DCP checkpoint (no .metadata) nor a folder holding a complete "
                            "step-N checkpoint")


def publish_checkpoint(tmp: Path, final: Path, meta: dict[str, Any] | None = None) -> None:
    """Mark ``tmp`` complete and rename it to ``final`` (single process; call after the write finished)."""
    if not (tmp / ".metadata").is_file():
        raise CheckpointError(f"cannot publish {tmp}: DCP did not write its .metadata")
    if meta is not None:
        write_meta(tmp, meta)
    marker = tmp / COMPLETE_MARKER
    with open(marker, "w", encoding="utf-8") as f:
        f.write(json.dumps({"completed_at": time.time()}) + "\n")
        f.flush()
        os.fsync(f.fileno())
    stale = None
    if final.exists():  # re-saving a step (or replacing an incomplete folder): move it out of the way first
        stale = final.with_name(final.name + ".replaced.tmp")
        shutil.rmtree(stale, ignore_errors=True)
        os.rename(final, stale)
    os.rename(tmp, final)
    _fsync_dir(final.parent)
    if stale is not None:
        shutil.rmtree(stale, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- model weights helpers


def model_args_to_dict(args: Any) -> dict[str, Any]:
    """Model args as JSON-compatible values (tuples become lists)."""
    if dataclasses.is_dataclass(args):
        raw = dataclasses.asdict(args)
    else:
        raw = dict(args) if isinstance(args, dict) else dict(vars(args))
    return json.loads(json.dumps(raw, default=str))


def strip_wrapper_prefixes(key: str) -> str:
    """Drop ``_orig_mod`` / ``_checkpoint_wrapped_module`` (compile / AC wrappers) from a parameter name."""
    return ".".join(part for part in key.split(".") if part not in _WRAPPER_PARTS)


def load_model_weights(path: str | os.PathLike, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model weights of a DCP checkpoint as full CPU tensors, keyed without the ``model.`` prefix.

    Reads only the ``model.*`` entries (not the optimizer); single process, no process group needed.
    """
    path = Path(path)
    md = dcp_metadata(path)
    state = {key: torch.empty(tuple(item.size), dtype=item.properties.dtype)
             for key, item in md.state_dict_metadata.items()
             if key.startswith("model.") and isinstance(item, TensorStorageMetadata)}
    if not state:
        raise CheckpointError(f"{path} holds no model weights (no 'model.*' entries)")
    with single_process_quiet():
        dcp.load(state, checkpoint_id=str(path), no_dist=True)
    out = {}
    for key, value in state.items():
        name = strip_wrapper_prefixes(key[len("model."):])
        out[name] = value.to(dtype) if dtype is not None and value.is_floating_point() else value
    return out


def model_key_problems(ckpt_md, model_sd: dict[str, Any]) -> list[str]:
    """Key and shape differences between the checkpoint's ``model.*`` entries and this model."""
    saved = {k[len("model."):]: tuple(v.size) for k, v in ckpt_md.state_dict_metadata.items()
             if k.startswith("model.") and isinstance(v, TensorStorageMetadata)}
    mine = {k: tuple(v.shape) for k, v in model_sd.items() if isinstance(v, torch.Tensor)}
    problems = []
    missing, unexpected = sorted(set(mine) - set(saved)), sorted(set(saved) - set(mine))
    if missing:
        problems.append(f"missing from the checkpoint: {shorten(missing)}")
    if unexpected:
        problems.append(f"in the checkpoint but not in the model: {shorten(unexpected)}")
    shapes = [f"{k}: checkpoint {list(saved[k])} vs model {list(mine[k])}"
              for k in sorted(set(saved) & set(mine)) if saved[k] != mine[k]]
    if shapes:
        problems.append("shape mismatch: " + shorten(shapes))
    return problems


def shorten(items: list[str], limit: int = 12) -> str:
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def args_diff(saved: dict[str, Any] | None, mine: dict[str, Any]) -> list[str]:
    if not saved:
        return []
    keys = sorted(set(saved) | set(mine))
    return [f"{k}: checkpoint {saved.get(k)!r} vs this run {mine.get(k)!r}"
            for k in keys if saved.get(k) != mine.get(k)]


DCP_KEY_ERRORS = (re.compile(r"Missing key in checkpoint state_dict: ([^\s]+?)\.?(?:\s|$)"),
                   re.compile(r"Size mismatch between saved (.+?) and current: (.+?) for ([^\s]+)"),
                   re.compile(r"Missing key: ([^\s]+?)\.?(?:\s|$)"))


def dcp_mismatch_keys(err: BaseException) -> list[str]:
    """Key names of a DCP planning error (missing key / size mismatch), empty for anything else."""
    text = str(err)
    found = []
    for pattern in DCP_KEY_ERRORS:
        for m in pattern.finditer(text):
            found.append(" ".join(m.groups()) if len(m.groups()) > 1 else m.group(1))
    return sorted(set(found))


def _build_model(meta: dict[str, Any], weights: dict[str, torch.Tensor], device: torch.device | str,
                 where: Path) -> tuple[torch.nn.Module, Any]:
    """The model a checkpoint's metadata names, built on `device` and loaded strictly from `weights`."""
    from ..models import get_model_spec  # the registry, imported here: the trainer's manager never needs it

    name, raw_args = meta.get("model_name"), meta.get("model_args")
    if not name or raw_args is None:
        raise CheckpointError(f"{where} records no model name and args; cannot rebuild its model")
    spec = get_model_spec(name)
    args = spec.args_cls(**raw_args)
    with torch.device("meta"):
        model = spec.model_cls(args)
    model.to_empty(device=device)
    model.init_buffers(device)
    weights = {strip_wrapper_prefixes(k): v for k, v in weights.items()}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{where} does not fit a {name} model built from its own args: missing "
                              f"{shorten(sorted(missing))}; unexpected {shorten(sorted(unexpected))}")
    return model, args


def load_model_from_checkpoint(path: str | os.PathLike, device: torch.device | str = "cpu"
                               ) -> tuple[torch.nn.Module, str, Any, Path]:
    """(model, model name, model args, checkpoint folder) rebuilt from a checkpoint's metadata and weights.

    `path` is a ``step-N`` folder or a checkpoint folder (its newest complete checkpoint). The model is
    built from the recorded name and args, then loaded strictly (buffers such as MoE expert biases too).
    One process, no process group; for diagnostics and inference, not for resuming a run.
    """
    folder = resolve_checkpoint_dir(path)
    meta = read_meta(folder) or {}
    if not meta.get("model_name"):
        raise CheckpointError(f"{folder} records no model name and args ({META_FILE}); cannot rebuild its model")
    model, args = _build_model(meta, load_model_weights(folder), device, folder)
    return model, meta["model_name"], args, folder


TORCH_FILE_META_KEY = "hydra_titan_meta"  # the checkpoint's hydra_titan.json inside a dcp-to-torch file


def load_inference_model(path: str | os.PathLike, device: torch.device | str = "cpu"
                         ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(model in eval mode, the checkpoint's metadata) from any checkpoint form:

    * a DCP ``step-N`` folder, or a run's checkpoint folder (its newest complete step);
    * ``scripts/convert_checkpoint.py dcp-to-safetensors`` output: the folder, or its model.safetensors
      (config.json beside it holds the model name, args and tokenizer);
    * a ``dcp-to-torch`` file (the whole state; its metadata rides along inside).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path {path} does not exist")
    if path.is_dir() and (path / "model.safetensors").is_file():
        path = path / "model.safetensors"
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        config = path.parent / "config.json"
        if not config.is_file():
            raise CheckpointError(f"{path} has no config.json beside it (written by dcp-to-safetensors)")
        meta = json.loads(config.read_text(encoding="utf-8"))
        model, _ = _build_model(meta, load_file(str(path)), device, path)
    elif path.is_file():
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001  (not a torch file: say what the path should be)
            raise CheckpointError(f"{path} is not a checkpoint file ({type(e).__name__}); give a DCP folder, a "
                                  "dcp-to-safetensors output or a dcp-to-torch file") from None
        if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
            raise CheckpointError(f"{path} holds no 'model' state dict (is it a dcp-to-torch file?)")
        meta = state.get(TORCH_FILE_META_KEY) or {}
        model, _ = _build_model(meta, state["model"], device, path)
    else:
        model, _, _, folder = load_model_from_checkpoint(path, device)
        meta = read_meta(folder) or {}
    return model.eval(), meta
