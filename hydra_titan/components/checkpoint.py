"""Distributed checkpoints (DESIGN §7): DCP save/load of the whole training state.

A checkpoint holds, under top-level keys of one DCP state dict: ``model`` and
``optimizer`` (through ``torch.distributed.checkpoint.state_dict``, so DCP
reshards them onto any data-parallel layout), ``lr_scheduler``, ``dataloader``
(its position), ``train_state`` (step, tokens_seen) and ``rng`` (one entry per
rank). Model-only checkpoints (seed checkpoints, final exports) hold ``model``
alone. Layout of the checkpoint folder::

    step-N/                published, complete: the only kind ever loaded
        .metadata          DCP global metadata
        __R_0.distcp       DCP data, one file per rank
        hydra_titan.json   step, reason, contents, model name + args, world size
        COMPLETE           written last, just before the rename
    step-N.tmp/            a save in progress, or one that was interrupted

Publication is atomic: every rank writes into ``step-N.tmp/``; once the write
is done (DCP has written ``.metadata``) rank 0, after a barrier, writes
``COMPLETE`` and renames the folder to ``step-N/``. A crash at any point
leaves either the previous checkpoints untouched or a ``.tmp`` folder that is
never loaded. On load, a ``step-N`` without its marker, or with a missing or
truncated data file, is skipped with a warning and the previous one is used.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

logger = logging.getLogger(__name__)

__all__ = ["CheckpointError", "CheckpointManager", "COMPLETE_MARKER", "META_FILE", "STATE_KEYS",
           "checkpoint_problem", "list_checkpoints", "load_model_weights", "model_args_to_dict", "read_meta",
           "resolve_checkpoint_dir", "strip_wrapper_prefixes", "publish_checkpoint", "write_meta",
           "single_process_quiet"]

COMPLETE_MARKER = "COMPLETE"
META_FILE = "hydra_titan.json"
FORMAT_VERSION = 1
STATE_KEYS = ("model", "optimizer", "lr_scheduler", "dataloader", "train_state", "rng")
EXCLUDABLE = STATE_KEYS[1:]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_STEP_DIR = re.compile(r"^step-(\d+)$")
_TMP_DIR = re.compile(r"^step-(\d+)\.tmp$")
_WRAPPER_PARTS = ("_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used by this run; the message says which and why."""


# --------------------------------------------------------------------------- folder helpers


def list_checkpoints(folder: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``step-N`` folder (complete or not), oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
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


def _dcp_metadata(path: Path):
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
        md = _dcp_metadata(path)
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
    complete = [p for _, p in list_checkpoints(path) if checkpoint_problem(p) is None]
    if complete:
        return complete[-1]
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
    md = _dcp_metadata(path)
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


def _model_key_problems(ckpt_md, model_sd: dict[str, Any]) -> list[str]:
    """Key and shape differences between the checkpoint's ``model.*`` entries and this model."""
    saved = {k[len("model."):]: tuple(v.size) for k, v in ckpt_md.state_dict_metadata.items()
             if k.startswith("model.") and isinstance(v, TensorStorageMetadata)}
    mine = {k: tuple(v.shape) for k, v in model_sd.items() if isinstance(v, torch.Tensor)}
    problems = []
    missing, unexpected = sorted(set(mine) - set(saved)), sorted(set(saved) - set(mine))
    if missing:
        problems.append(f"missing from the checkpoint: {_short(missing)}")
    if unexpected:
        problems.append(f"in the checkpoint but not in the model: {_short(unexpected)}")
    shapes = [f"{k}: checkpoint {list(saved[k])} vs model {list(mine[k])}"
              for k in sorted(set(saved) & set(mine)) if saved[k] != mine[k]]
    if shapes:
        problems.append("shape mismatch: " + _short(shapes))
    return problems


def _short(items: list[str], limit: int = 12) -> str:
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _args_diff(saved: dict[str, Any] | None, mine: dict[str, Any]) -> list[str]:
    if not saved:
        return []
    keys = sorted(set(saved) | set(mine))
    return [f"{k}: checkpoint {saved.get(k)!r} vs this run {mine.get(k)!r}"
            for k in keys if saved.get(k) != mine.get(k)]


_DCP_KEY_ERRORS = (re.compile(r"Missing key in checkpoint state_dict: ([^\s]+?)\.?(?:\s|$)"),
                   re.compile(r"Size mismatch between saved (.+?) and current: (.+?) for ([^\s]+)"),
                   re.compile(r"Missing key: ([^\s]+?)\.?(?:\s|$)"))


def _dcp_mismatch(err: BaseException) -> list[str]:
    """Key names of a DCP planning error (missing key / size mismatch), empty for anything else."""
    text = str(err)
    found = []
    for pattern in _DCP_KEY_ERRORS:
        for m in pattern.finditer(text):
            found.append(" ".join(m.groups()) if len(m.groups()) > 1 else m.group(1))
    return sorted(set(found))


# --------------------------------------------------------------------------- the manager


class CheckpointManager:
    """Saves and restores the training state of the trainer (see the module docstring).

    Collective: every rank constructs it and calls ``load``/``maybe_save``/``save``/``close``
    at the same points. Rank 0 alone creates, renames and deletes folders, between barriers.
    ``optimizer``, ``lr_scheduler``, ``dataloader`` and ``train_state`` may be None (seed
    checkpoints); anything with ``state_dict``/``load_state_dict`` works.
    """

    def __init__(self, cfg, *, folder: str | os.PathLike, model: torch.nn.Module, optimizer=None, lr_scheduler=None,
                 dataloader=None, train_state=None, model_args: Any = None, model_name: str = "") -> None:
        self.cfg = cfg
        self.enabled = bool(cfg.enable)
        self.folder = Path(folder)
        self.model, self.optimizer, self.lr_scheduler = model, optimizer, lr_scheduler
        self.dataloader, self.train_state = dataloader, train_state
        self.model_name = model_name
        self.model_args = model_args_to_dict(model_args) if model_args is not None else None
        unknown = sorted(set(cfg.exclude_from_loading) - set(EXCLUDABLE))
        if unknown:
            raise ValueError(f"checkpoint.exclude_from_loading: unknown entries {unknown}; allowed: {list(EXCLUDABLE)}")
        self.exclude = set(cfg.exclude_from_loading)
        initialized = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if initialized else 0
        self.world_size = dist.get_world_size() if initialized else 1
        # one rank (also a 1-rank process group) needs no collective at all: DCP runs with no_dist
        self.distributed = initialized and self.world_size > 1
        self._pg = None  # main-thread coordination: the default group when it is gloo, else a gloo group
        self._async_pg = None  # DCP's collectives in a background save: never shared with training's
        self._pending: dict[str, Any] | None = None
        self._last_saved_step = -1
        if self.enabled and self.distributed and "gloo" not in str(dist.get_backend()).lower():
            self._pg = dist.new_group(backend="gloo")
        if self.enabled and initialized and cfg.async_mode == "async":
            # dcp.async_save needs a CPU-capable group even on one rank (the default one may be nccl only)
            self._async_pg = dist.new_group(backend="gloo")

    # ------------------------------------------------------------------ collectives
    def _barrier(self) -> None:
        if self.distributed:
            dist.barrier(group=self._pg)

    def _broadcast(self, obj: Any) -> Any:
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self._pg)
        return box[0]

    # ------------------------------------------------------------------ load
    def load(self) -> bool:
        """Restore the newest complete checkpoint (or ``load_step`` / ``initial_load_path``); True if loaded."""
        if not self.enabled:
            return False
        plan = self._broadcast(self._plan_load() if self.rank == 0 else None)
        if isinstance(plan, Exception):
            raise plan
        candidates, notes = plan
        if self.rank == 0:
            for note in notes:
                logger.warning("%s", note)
        if not candidates:
            logger.info("no checkpoint in %s: starting from scratch", self.folder)
            return False
        failures = []
        for path in candidates:
            problem = self._broadcast(self._check(path) if self.rank == 0 else None)
            if problem is not None:
                kind, message = problem
                if kind == "mismatch":
                    raise CheckpointError(message)
                logger.warning("skipping checkpoint %s: %s; falling back to the previous one", path, message)
                failures.append(f"{path.name}: {message}")
                continue
            try:
                self._load_from(path)
            except CheckpointError:
                raise
            except (Exception, CheckpointException) as e:  # DCP errors are collective: every rank gets here
                keys = _dcp_mismatch(e)
                if keys:
                    raise CheckpointError(f"checkpoint {path} does not match this run's state: {', '.join(keys)}. "
                                          "(a different model/flavor or optimizer? checkpoint.exclude_from_loading "
                                          "can leave the optimizer out)") from e
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                logger.warning("skipping checkpoint %s: reading it failed (%s: %s); falling back to the previous one",
                               path, type(e).__name__, first)
                failures.append(f"{path.name}: {type(e).__name__}: {first}")
                continue
            return True
        raise CheckpointError(f"no checkpoint in {self.folder} could be loaded ({'; '.join(failures)}). Move the "
                              "broken folders away (or set checkpoint.load_step) to go on.")

    def _plan_load(self) -> tuple[list[Path], list[str]] | Exception:
        """Rank 0: the checkpoints to try, newest first, and warnings about the ones left out."""
        notes = [f"ignoring {p.name} in {self.folder}: an interrupted save (never published)"
                 for p in sorted(self.folder.glob("step-*.tmp")) if _TMP_DIR.match(p.name)]
        found = list_checkpoints(self.folder)
        if self.cfg.load_step >= 0:
            path = self.folder / f"step-{self.cfg.load_step}"
            problem = checkpoint_problem(path)
            if problem is not None:
                return FileNotFoundError(f"checkpoint.load_step = {self.cfg.load_step}: {path} is not a usable "
                                         f"checkpoint ({problem}); available: {[p.name for _, p in found] or 'none'}")
            return [path], notes
        if found:
            return [p for _, p in reversed(found)], notes
        if self.cfg.initial_load_path:
            try:
                path = resolve_checkpoint_dir(self.cfg.initial_load_path)
            except FileNotFoundError as e:
                return FileNotFoundError(f"checkpoint.initial_load_path: {e}")
            problem = checkpoint_problem(path, require_marker=False)
            if problem is not None:
                return CheckpointError(f"checkpoint.initial_load_path {path} is not usable: {problem}")
            notes.append(f"no checkpoint in {self.folder}: initialising from checkpoint.initial_load_path {path}")
            return [path], notes
        return [], notes

    def _check(self, path: Path) -> tuple[str, str] | None:
        """Rank 0: ("corrupt" | "mismatch", why) or None when ``path`` can be loaded into this model."""
        in_folder = path.parent.resolve() == self.folder.resolve()
        problem = checkpoint_problem(path, require_marker=in_folder)
        if problem is not None:
            return "corrupt", problem
        meta = read_meta(path) or {}
        saved_name = meta.get("model_name")
        if saved_name and self.model_name and saved_name != self.model_name:
            return "mismatch", (f"checkpoint {path} is of model {saved_name!r}, this run trains {self.model_name!r}")
        problems = _model_key_problems(_dcp_metadata(path), get_model_state_dict(self.model))
        if problems:
            diff = _args_diff(meta.get("model_args"), self.model_args or {})
            args = f"model args that differ: {_short(diff)}; " if diff else ""
            return "mismatch", (f"checkpoint {path} does not fit the model of this run (another model or flavor?): "
                                f"{args}{'; '.join(problems)}")
        diff = _args_diff(meta.get("model_args"), self.model_args or {})
        if diff:
            logger.warning("checkpoint %s was saved with other model args (shapes agree, loading anyway): %s",
                           path, _short(diff))
        return None

    def _load_from(self, path: Path) -> None:
        md = _dcp_metadata(path)
        saved = {key.split(".", 1)[0] for key in md.state_dict_metadata}
        rng_key = f"rank{self.rank}"
        wanted = [k for k in STATE_KEYS if k in saved and k not in self.exclude and self._owner(k) is not None]
        if "rng" in wanted and not any(k.startswith(f"rng.{rng_key}.") for k in md.state_dict_metadata):
            wanted.remove("rng")
            logger.warning("checkpoint %s has no RNG state for rank %d (saved with fewer ranks): keeping this "
                           "run's RNG state", path, self.rank)
        skipped = [k for k in STATE_KEYS[1:5] if k not in saved and self._owner(k) is not None]
        if skipped and self.rank == 0:
            logger.warning("checkpoint %s holds only %s: %s start fresh", path, sorted(saved), ", ".join(skipped))
        excluded = sorted(self.exclude & saved)
        if excluded and self.rank == 0:
            logger.warning("not restoring %s (checkpoint.exclude_from_loading)", ", ".join(excluded))
        start = time.perf_counter()
        state: dict[str, Any] = {}
        if "model" in wanted:
            state["model"] = get_model_state_dict(self.model)
        if "optimizer" in wanted:
            state["optimizer"] = get_optimizer_state_dict(self.model, self.optimizer)
        if "lr_scheduler" in wanted:
            state["lr_scheduler"] = _scheduler_state(self.lr_scheduler)
        if "dataloader" in wanted:
            state["dataloader"] = self.dataloader.state_dict()
        if "train_state" in wanted:
            state["train_state"] = self.train_state.state_dict()
        if "rng" in wanted:  # only the generators this checkpoint has for this rank (a GPU run also has cuda)
            state["rng"] = {rng_key: {name: t for name, t in _rng_state().items()
                                      if f"rng.{rng_key}.{name}" in md.state_dict_metadata}}
        with single_process_quiet():
            dcp.load(state, checkpoint_id=str(path), process_group=self._pg, no_dist=not self.distributed)

        if "model" in state:
            set_model_state_dict(self.model, state["model"], options=StateDictOptions(strict=True))
        if "optimizer" in state:
            set_optimizer_state_dict(self.model, self.optimizer, optim_state_dict=state["optimizer"])
        if "lr_scheduler" in state:
            full = self.lr_scheduler.state_dict()
            full.update(state["lr_scheduler"])
            self.lr_scheduler.load_state_dict(full)
            if self.optimizer is not None:  # the lr of the next step, even when the optimizer was not restored
                for group, lr in zip(self.optimizer.param_groups, self.lr_scheduler.get_last_lr()):
                    group["lr"] = lr
        if "train_state" in state:
            self.train_state.load_state_dict(state["train_state"])
        if "dataloader" in state:
            try:
                self.dataloader.load_state_dict(state["dataloader"])
            except ValueError as e:
                raise CheckpointError(
                    f"cannot restore the data position from {path}: {e}. Keep the global batch "
                    "(local_batch_size x data-parallel degree) of the saved run, or add 'dataloader' to "
                    "checkpoint.exclude_from_loading to restart the data order (data will repeat)") from e
        elif "train_state" in state and self.dataloader is not None and self.rank == 0:
            logger.warning("the data position was not restored: the data order restarts from the beginning")
        if "rng" in state:
            _set_rng_state(state["rng"][rng_key])
        step = self.train_state.step if self.train_state is not None and "train_state" in state else 0
        self._last_saved_step = step
        logger.info("loaded checkpoint %s (%s) in %.2f s: resuming at step %d", path, ", ".join(sorted(state)),
                    time.perf_counter() - start, step)

    def _owner(self, key: str) -> Any:
        return {"model": self.model, "optimizer": self.optimizer, "lr_scheduler": self.lr_scheduler,
                "dataloader": self.dataloader, "train_state": self.train_state, "rng": True}[key]

    # ------------------------------------------------------------------ save
    def maybe_save(self, step: int, last_step: bool = False) -> None:
        """Save every ``interval`` steps and at the last step (synchronously, model-only if configured)."""
        if not self.enabled:
            return
        self._publish_if_done()
        if last_step:
            model_only = self.cfg.last_save_model_only
            self.save(step, reason="last", model_only=model_only,
                      export_dtype=self.cfg.export_dtype if model_only else None)
        elif step % self.cfg.interval == 0:
            self.save(step, reason="interval", asynchronous=self.cfg.async_mode == "async")

    def save(self, step: int, reason: str = "manual", *, model_only: bool = False, export_dtype: str | None = None,
             asynchronous: bool = False) -> None:
        """Write ``step-N`` (collective). A step already saved by this run is not saved again.

        ``model_only``: only the model weights (a seed checkpoint or a final export), cast to
        ``export_dtype`` ("float32" | "bfloat16") when given; ``asynchronous``: return once the state
        is staged in memory and write it in the background (``close`` or the next save waits for it).
        """
        if not self.enabled:
            return
        if step == self._last_saved_step:
            logger.info("step %d is already checkpointed; not saving it again (%s)", step, reason)
            return
        self._wait_pending()
        tmp, final = self.folder / f"step-{step}.tmp", self.folder / f"step-{step}"
        contents = ["model"] if model_only else [k for k in STATE_KEYS if self._owner(k) is not None]
        dtype = DTYPES[export_dtype] if export_dtype else None
        meta = {"format_version": FORMAT_VERSION, "step": step, "reason": reason, "contents": contents,
                "model_name": self.model_name, "model_args": self.model_args, "world_size": self.world_size,
                "export_dtype": export_dtype, "torch_version": torch.__version__}
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            write_meta(tmp, meta)
        self._barrier()
        start = time.perf_counter()
        state = self._state_to_save(contents, dtype)
        self._last_saved_step = step
        if asynchronous:
            with single_process_quiet():
                response = dcp.async_save(state, checkpoint_id=str(tmp), process_group=self._async_pg,
                                          no_dist=not self.distributed)
            future = getattr(response, "upload_completion", response)
            self._pending = {"step": step, "tmp": tmp, "final": final, "future": future, "start": start,
                             "reason": reason, "published": False}
            logger.info("checkpoint step-%d (%s): staged in %.2f s, writing in the background", step, reason,
                        time.perf_counter() - start)
            return
        with single_process_quiet():
            dcp.save(state, checkpoint_id=str(tmp), process_group=self._pg, no_dist=not self.distributed)
        self._barrier()
        if self.rank == 0:
            self._publish(tmp, final)
            logger.info("saved checkpoint %s (%s%s) in %.2f s", final, reason,
                        ", model only" + (f" in {export_dtype}" if export_dtype else "") if model_only else "",
                        time.perf_counter() - start)
        self._barrier()

    def _state_to_save(self, contents: list[str], dtype: torch.dtype | None) -> dict[str, Any]:
        state: dict[str, Any] = {}
        model_sd = get_model_state_dict(self.model)
        if dtype is not None:
            model_sd = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v
                        for k, v in model_sd.items()}
        state["model"] = model_sd
        if "optimizer" in contents:
            state["optimizer"] = get_optimizer_state_dict(self.model, self.optimizer)
        if "lr_scheduler" in contents:
            state["lr_scheduler"] = _scheduler_state(self.lr_scheduler)
        if "dataloader" in contents:
            state["dataloader"] = self.dataloader.state_dict()
        if "train_state" in contents:
            state["train_state"] = self.train_state.state_dict()
        if "rng" in contents:
            state["rng"] = {f"rank{self.rank}": _rng_state()}
        return state

    def _publish(self, tmp: Path, final: Path) -> None:
        """Rank 0, once every rank's data is written: marker, rename, then keep_latest_k."""
        publish_checkpoint(tmp, final)
        self._purge(keep=final)

    def _purge(self, keep: Path) -> None:
        for stale in self.folder.glob("step-*.tmp"):
            if _TMP_DIR.match(stale.name) and (self._pending is None or stale != self._pending["tmp"]):
                logger.info("removing %s (left by an interrupted save)", stale)
                shutil.rmtree(stale, ignore_errors=True)
        k = self.cfg.keep_latest_k
        if k <= 0:
            return
        complete = [p for _, p in list_checkpoints(self.folder) if (p / COMPLETE_MARKER).is_file()]
        for old in complete[:-k]:
            if old != keep:
                logger.info("removing %s (keep_latest_k = %d)", old, k)
                shutil.rmtree(old, ignore_errors=True)

    def _publish_if_done(self) -> None:
        """Rank 0, no collective: publish a finished background save as soon as it is seen."""
        p = self._pending
        if p is None or p["published"] or self.rank != 0 or not p["future"].done():
            return
        if p["future"].exception() is None:  # DCP resolves rank 0's future after all ranks wrote + .metadata
            self._publish(p["tmp"], p["final"])
            p["published"] = True
            logger.info("saved checkpoint %s (%s, async) in %.2f s", p["final"], p["reason"],
                        time.perf_counter() - p["start"])

    def _wait_pending(self) -> None:
        """Collective: finish the outstanding background save (its errors are raised here)."""
        p = self._pending
        if p is None:
            return
        self._pending = None
        p["future"].result()  # a failed write raises on every rank (DCP gathers the errors)
        self._barrier()
        if self.rank == 0 and not p["published"]:
            self._publish(p["tmp"], p["final"])
            logger.info("saved checkpoint %s (%s, async) in %.2f s", p["final"], p["reason"],
                        time.perf_counter() - p["start"])
        self._barrier()

    def close(self) -> None:
        """Wait for an outstanding background save and publish it (collective)."""
        if self.enabled:
            self._wait_pending()


def _scheduler_state(scheduler) -> dict[str, Any]:
    # LambdaLR's lr_lambdas carry no state for a functools.partial, and the schedule comes from the config
    return {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    if "cpu" in state:
        torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
