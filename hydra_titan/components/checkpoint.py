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
never loaded (the next start removes it). On load, a ``step-N`` without its
marker, or with a missing or truncated data file, is skipped with a warning and
the previous one is used.

A save that fails (a full disk, any write error on any rank: DCP gathers them,
so every rank sees the failure) removes its ``.tmp`` folder, logs what failed
and which checkpoint is kept, then stops the run or trains on
(``checkpoint.on_save_error``); ``keep_latest_k`` prunes only after a new
checkpoint is published, so the last good one is never deleted.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from .checkpoint_files import (  # noqa: F401  (re-exported for the scripts)
    COMPLETE_MARKER,
    CheckpointError,
    DTYPES,
    EXCLUDABLE,
    FORMAT_VERSION,
    META_FILE,
    STATE_KEYS,
    TMP_DIR_RE,
    args_diff,
    dcp_metadata,
    dcp_mismatch_keys,
    model_key_problems,
    shorten,
    checkpoint_problem,
    list_checkpoints,
    load_model_weights,
    model_args_to_dict,
    publish_checkpoint,
    read_meta,
    resolve_checkpoint_dir,
    single_process_quiet,
    strip_wrapper_prefixes,
    write_meta,
)
from .faults import FaultInjector

logger = logging.getLogger(__name__)

__all__ = ["CheckpointError", "CheckpointManager", "COMPLETE_MARKER", "META_FILE", "STATE_KEYS",
           "checkpoint_problem", "list_checkpoints", "load_model_weights", "model_args_to_dict", "read_meta",
           "resolve_checkpoint_dir", "strip_wrapper_prefixes", "publish_checkpoint", "write_meta",
           "single_process_quiet"]

# --------------------------------------------------------------------------- the manager


class CheckpointManager:
    """Saves and restores the training state of the trainer (see the module docstring).

    Collective: every rank constructs it and calls ``load``/``maybe_save``/``save``/``close``
    at the same points. Rank 0 alone creates, renames and deletes folders, between barriers.
    ``optimizer``, ``lr_scheduler``, ``dataloader`` and ``train_state`` may be None (seed
    checkpoints); anything with ``state_dict``/``load_state_dict`` works.
    """

    def __init__(self, cfg, *, folder: str | os.PathLike, model: torch.nn.Module, optimizer=None, lr_scheduler=None,
                 dataloader=None, train_state=None, model_args: Any = None, model_name: str = "",
                 tokenizer: str = "", cpu_group: Any = None, faults: FaultInjector | None = None) -> None:
        """``cpu_group``: a gloo group the caller already has for main-thread coordination (the trainer's
        ``DistInfo.cpu_group``); without one, a non-gloo default group gets a gloo group of its own.
        ``faults``: the test harness's injected failures (components/faults.py), None in real runs."""
        self.cfg = cfg
        self.enabled = bool(cfg.enable)
        self.folder = Path(folder)
        self.model, self.optimizer, self.lr_scheduler = model, optimizer, lr_scheduler
        self.dataloader, self.train_state = dataloader, train_state
        self.model_name = model_name
        self.tokenizer = tokenizer  # recorded so generate/evaluate rebuild the run's tokenizer
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
        self.faults = faults
        if self.enabled and self.distributed and "gloo" not in str(dist.get_backend()).lower():
            self._pg = cpu_group if cpu_group is not None else dist.new_group(backend="gloo")
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
        """Restore the newest complete checkpoint (or ``load_step`` / ``initial_load_path``); True if loaded.

        With checkpointing off nothing loads, so asking for a step or a path then is an error, not a
        silent fresh start."""
        if not self.enabled:
            asked = [f"checkpoint.{key} = {value!r}" for key, value in
                     (("load_step", self.cfg.load_step), ("initial_load_path", self.cfg.initial_load_path))
                     if value not in (-1, "")]
            if asked:
                raise CheckpointError(f"{' and '.join(asked)} needs checkpoint.enable = true: with checkpointing off "
                                      "nothing is loaded (--checkpoint.enable true loads it and saves on)")
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
                keys = dcp_mismatch_keys(e)
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
        notes = []
        for stale in sorted(self.folder.glob("step-*.tmp")):  # no save of this run is under way yet
            if TMP_DIR_RE.match(stale.name):
                shutil.rmtree(stale, ignore_errors=True)
                notes.append(f"removed {stale.name} from {self.folder}: an interrupted save (never published)")
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
        problems = model_key_problems(dcp_metadata(path), get_model_state_dict(self.model))
        if problems:
            diff = args_diff(meta.get("model_args"), self.model_args or {})
            args = f"model args that differ: {shorten(diff)}; " if diff else ""
            return "mismatch", (f"checkpoint {path} does not fit the model of this run (another model or flavor?): "
                                f"{args}{'; '.join(problems)}")
        diff = args_diff(meta.get("model_args"), self.model_args or {})
        if diff:
            logger.warning("checkpoint %s was saved with other model args (shapes agree, loading anyway): %s",
                           path, shorten(diff))
        return None

    def _load_from(self, path: Path) -> None:
        md = dcp_metadata(path)
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
        state = {key: self._live_state(key) for key in wanted}
        if "rng" in state:  # only the generators this checkpoint has for this rank (a GPU run also has cuda)
            state["rng"] = {rng_key: {name: t for name, t in state["rng"][rng_key].items()
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

    def _live_state(self, key: str) -> Any:
        """This run's state under one checkpoint key: what a save writes, and what a load fills in place."""
        if key == "model":
            return get_model_state_dict(self.model)
        if key == "optimizer":
            return get_optimizer_state_dict(self.model, self.optimizer)
        if key == "lr_scheduler":
            return _scheduler_state(self.lr_scheduler)
        if key == "rng":
            return {f"rank{self.rank}": _rng_state()}
        return self._owner(key).state_dict()  # dataloader, train_state

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
                "model_name": self.model_name, "model_args": self.model_args, "tokenizer": self.tokenizer,
                "world_size": self.world_size,
                "export_dtype": export_dtype, "torch_version": torch.__version__}
        failure = self._broadcast(_error_text(self._prepare_tmp, tmp, meta) if self.rank == 0 else None)
        if failure is not None:
            self._save_failed(step, reason, tmp, failure)
            return
        start = time.perf_counter()
        state = self._state_to_save(contents, dtype)
        writer = self.faults.storage_writer(tmp, step) if self.faults else None
        previous, self._last_saved_step = self._last_saved_step, step
        if asynchronous:
            with single_process_quiet():
                response = dcp.async_save(state, checkpoint_id=str(tmp), storage_writer=writer,
                                          process_group=self._async_pg, no_dist=not self.distributed)
            future = getattr(response, "upload_completion", response)
            self._pending = {"step": step, "tmp": tmp, "final": final, "future": future, "start": start,
                             "reason": reason, "published": False, "previous": previous}
            logger.info("checkpoint step-%d (%s): staged in %.2f s, writing in the background", step, reason,
                        time.perf_counter() - start)
            return
        try:
            with single_process_quiet():
                dcp.save(state, checkpoint_id=str(tmp), storage_writer=writer, process_group=self._pg,
                         no_dist=not self.distributed)
        except (OSError, CheckpointException) as e:  # DCP gathers every rank's write error: all ranks get here
            self._last_saved_step = previous
            self._save_failed(step, reason, tmp, describe_save_error(e))
            return
        self._barrier()
        failure = self._broadcast(_error_text(self._publish, tmp, final) if self.rank == 0 else None)
        if failure is not None:
            self._last_saved_step = previous
            self._save_failed(step, reason, tmp, failure)
            return
        if self.rank == 0:
            logger.info("saved checkpoint %s (%s%s) in %.2f s", final, reason,
                        ", model only" + (f" in {export_dtype}" if export_dtype else "") if model_only else "",
                        time.perf_counter() - start)
        if self.faults:
            self.faults.kill("kill_after_publish", step)

    def _prepare_tmp(self, tmp: Path, meta: dict[str, Any]) -> None:
        """Rank 0: an empty ``step-N.tmp`` holding the metadata file."""
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        write_meta(tmp, meta)

    def _save_failed(self, step: int, reason: str, tmp: Path, error: str) -> None:
        """Every rank, after a failed save: drop the partial folder, say what is kept, apply the policy.

        The final save (reason "last") always stops the run with an error: training on is not possible
        and reporting success would lose the run's last stretch of work."""
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        complete = [p for _, p in list_checkpoints(self.folder) if (p / COMPLETE_MARKER).is_file()]
        kept = f"{complete[-1].name} is the newest complete checkpoint and is kept" if complete else \
            "there is no complete checkpoint yet"
        stop = self.cfg.on_save_error == "stop" or reason == "last"
        message = f"checkpoint step-{step} ({reason}) could not be written: {error}; {kept}"
        if stop:
            raise CheckpointError(f"{message} (checkpoint.on_save_error = {self.cfg.on_save_error}"
                                  f"{'; the final save' if reason == 'last' else ''}): stopping")
        if self.rank == 0:
            logger.error("%s; training on (checkpoint.on_save_error = continue): the next save tries again",
                         message)

    def _state_to_save(self, contents: list[str], dtype: torch.dtype | None) -> dict[str, Any]:
        state = {key: self._live_state(key) for key in contents}
        if dtype is not None:
            state["model"] = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v
                              for k, v in state["model"].items()}
        return state

    def _publish(self, tmp: Path, final: Path) -> None:
        """Rank 0, once every rank's data is written: marker, rename, then keep_latest_k."""
        publish_checkpoint(tmp, final)
        self._purge(keep=final)

    def _purge(self, keep: Path) -> None:
        for stale in self.folder.glob("step-*.tmp"):
            if TMP_DIR_RE.match(stale.name) and (self._pending is None or stale != self._pending["tmp"]):
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
        """Rank 0, no collective: publish a finished background save as soon as it is seen. A failed one
        is only logged here; every rank handles it at the next save or at close (`_wait_pending`)."""
        p = self._pending
        if p is None or p["published"] or self.rank != 0 or not p["future"].done():
            return
        error = p["future"].exception()
        if error is not None:
            if not p.get("reported"):
                p["reported"] = True
                logger.error("background checkpoint step-%d failed: %s", p["step"], describe_save_error(error))
            return
        # DCP resolves rank 0's future after all ranks wrote + .metadata
        p["publish_error"] = self._publish_pending(p)  # a failure is handled at the next collective point
        if p["publish_error"] is None and self.faults:
            self.faults.kill("kill_after_publish", p["step"])

    def _publish_pending(self, p: dict[str, Any]) -> str | None:
        """Rank 0: publish the background save `p` once; the error text, or None when it is published."""
        failure = _error_text(self._publish, p["tmp"], p["final"])
        if failure is None:
            p["published"] = True
            logger.info("saved checkpoint %s (%s, async) in %.2f s", p["final"], p["reason"],
                        time.perf_counter() - p["start"])
        return failure

    def _wait_pending(self) -> None:
        """Collective: finish the outstanding background save; a failed one goes to `_save_failed`."""
        p = self._pending
        if p is None:
            return
        self._pending = None
        try:
            p["future"].result()  # a failed write raises on every rank (DCP gathers the errors)
            failure = None
        except (Exception, CheckpointException) as e:  # noqa: BLE001  (any write error fails the save)
            failure = describe_save_error(e)
        if failure is None:
            self._barrier()
            if self.rank == 0 and not p["published"]:
                failure = p.get("publish_error") or self._publish_pending(p)
            failure = self._broadcast(failure)
        if failure is not None:
            self._last_saved_step = p["previous"]
            self._save_failed(p["step"], p["reason"], p["tmp"], failure)
        elif self.faults:
            self.faults.kill("kill_after_publish", p["step"])

    def close(self) -> None:
        """Wait for an outstanding background save and publish it (collective)."""
        if self.enabled:
            self._wait_pending()


def describe_save_error(error: BaseException) -> str:
    """One line per failed rank of a DCP error (it gathers them), or the error itself."""
    failures = getattr(error, "failures", None)
    if isinstance(failures, dict) and failures:
        parts = []
        for rank, failure in sorted(failures.items()):
            exc = failure[0] if isinstance(failure, tuple) else failure  # DCP wraps each as (error, stack)
            parts.append(f"rank {rank}: {type(exc).__name__}: {exc}")
        return "; ".join(parts)
    return f"{type(error).__name__}: {error}"


def _error_text(fn, *args) -> str | None:
    """Run `fn(*args)` (a rank-0 file operation); the OSError it raised as text, or None."""
    try:
        fn(*args)
    except OSError as e:
        return describe_save_error(e)
    return None


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
