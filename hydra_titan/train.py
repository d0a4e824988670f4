"""The trainer: build -> parallelize -> train loop (`python -m hydra_titan.train --config ...`).

One code path for every launch: a plain `python` run forms a one-rank process
group, so FSDP2 (with its mixed-precision policy) wraps the model whether it
runs on one CPU, one GPU or many nodes under torchrun.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .components.checkpoint import CheckpointError, CheckpointManager
from .components.dataloader import (FILE_SOURCES, PackedWindows, TokenDataLoader, heldout_loader, load_windows,
                                    split_loader)
from .components.faults import FaultInjector
from .components.loss import build_loss_fn, bytes_of_targets, count_target_tokens
from .components.lr_scheduler import build_lr_scheduler, fit_warmup
from .components.metrics import (MetricsLogger, Throughput, moe_load_scalars, peak_flops, peak_memory_gib,
                                 routing_scalars)
from .components.optimizer import build_optimizer
from .components.step_guard import NonFiniteError, NonFiniteGuard
from .components.tokenizer import Tokenizer, build_tokenizer
from .components.tracking import RunInfo, RunTracker, TrackingError, git_commit
from .config import ConfigError, JobConfig, parse_or_exit, save_config
from .config.manager import config_to_dict
from .config.toml_writer import to_toml
from .distributed import (DistInfo, ParallelDims, all_reduce, clip_grad_norm_, init_distributed, parallelize_decoder,
                          resolve_device_type, shutdown_and_exit)
from .distributed.compile import eager_eval
from .distributed.cuda_graph import CapturedMicroStep
from .distributed.float8 import precompute_float8_scales
from .distributed.init import init_model_weights
from .models import ModelSpec, get_model_spec
from .models.registry import format_model_list
from .models.common.moe import moe_layers, update_expert_biases

logger = logging.getLogger("hydra_titan")

VOCAB_MULTIPLE = 128  # pad the embedding/head to a GEMM-friendly size; extra rows never see a target


@dataclass
class TrainState:
    step: int = 0
    tokens_seen: int = 0

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "tokens_seen": self.tokens_seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])


def resolve_model_args(spec: ModelSpec, cfg: JobConfig, tokenizer: Tokenizer) -> Any:
    """The flavor's args with the config's overrides, sized to the tokenizer and sequence length."""
    overrides = dict(cfg.model.overrides)
    vocab = overrides.get("vocab_size")
    if vocab is None:
        overrides["vocab_size"] = VOCAB_MULTIPLE * math.ceil(tokenizer.n_words / VOCAB_MULTIPLE)
    elif vocab < tokenizer.n_words:
        raise ConfigError(f"model.overrides.vocab_size ({vocab}) is smaller than the vocabulary of tokenizer "
                          f"{cfg.tokenizer.name!r} ({tokenizer.n_words} ids)")
    try:
        args = spec.args(cfg.model.flavor, **overrides)
        if args.max_seq_len < cfg.training.seq_len:
            args = args.replace(max_seq_len=cfg.training.seq_len)
    except ValueError as e:
        raise ConfigError(f"model ({cfg.model.name}, flavor {cfg.model.flavor}): {e}") from e
    return args


class Trainer:
    def __init__(self, cfg: JobConfig, dist: DistInfo | None = None):
        """`dist`: the process group an earlier Trainer of this process joined (benchmarks build one
        Trainer per case); None joins torchrun's group, or forms a 1-rank one."""
        self.cfg = cfg
        device_type = resolve_device_type(cfg.training.device)
        self.dist = dist if dist is not None else init_distributed(device_type)
        self.device = self.dist.device
        self.is_rank0 = self.dist.rank == 0
        self.captured_step = self._build_captured_step()  # before any work: it checks the device
        self.dump_folder = Path(cfg.job.dump_folder)
        self.parallel_dims = ParallelDims.resolve(cfg.parallelism.dp_replicate, cfg.parallelism.dp_shard,
                                                  self.dist.world_size)
        mesh = self.parallel_dims.build_mesh(device_type)
        if cfg.job.deterministic:
            torch.use_deterministic_algorithms(True)
        torch.manual_seed(cfg.job.seed)  # same on every rank: identical initial weights

        try:
            self.faults = FaultInjector(cfg.debug.faults, rank=self.dist.rank, folder=self.dump_folder)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.tokenizer = build_tokenizer(cfg.tokenizer.name)
        self._token_bytes: torch.Tensor | None = None  # UTF-8 bytes per id, for validation bits-per-byte
        # data before the model: a bad path or source fails in seconds, not after materialising weights
        d = cfg.data
        windows = load_windows(source=d.source, path=d.path, tokenizer=self.tokenizer, seq_len=cfg.training.seq_len,
                               text_field=d.text_field, hf_name=d.hf_name, hf_split=d.hf_split)  # once, both splits
        self.train_loader = self._split_loader(windows, "train")
        self.val_loader = self._val_loader(windows) if cfg.validation.enable else None
        if self.val_loader is not None and len(self.val_loader) == 0:
            # reporting a loss over zero tokens would print 0.0 as if it were one
            where = "data.val_path holds" if cfg.data.val_path else "the validation split holds"
            fix = "a larger data.val_path" if cfg.data.val_path else "raise data.val_fraction"
            logger.warning("validation is off: %s less than one global batch (%s, or lower training.seq_len / "
                           "local_batch_size)", where, fix)
            self.val_loader = None
        self.spec = get_model_spec(cfg.model.name)
        self.model_args = resolve_model_args(self.spec, cfg, self.tokenizer)
        with torch.device("meta"):
            model = self.spec.model_cls(self.model_args)
        self.params = params = self.spec.param_report(self.model_args, cfg.training.seq_len, model=model)
        self.flops = self.spec.flops_per_token(self.model_args, cfg.training.seq_len)
        logger.info("model %s/%s: %.1fM params (%.1fM non-embedding, %.1fM active/token), "
                    "%.3f GFLOP/token executed (%.3f dense-equivalent)", cfg.model.name, cfg.model.flavor,
                    params.total / 1e6, params.non_embedding / 1e6, params.active / 1e6,
                    self.flops.executed / 1e9, self.flops.dense / 1e9)

        parallelize = self.spec.parallelize_fn or parallelize_decoder
        self.model = parallelize(model, parallel_dims=self.parallel_dims, mesh=mesh, cfg=cfg,
                                 options=self.spec.parallelize_options)
        self.model.to_empty(device=self.device)
        init_model_weights(self.model, build_unsharded=lambda: self.spec.model_cls(self.model_args),
                           device=self.device, mode=cfg.parallelism.init_mode, seed=cfg.job.seed)
        self.model.train()
        self.moe_layers = moe_layers(self.model)  # once: the bias update after every step walks this list

        o = cfg.optimizer
        self.optimizer = build_optimizer(self.model, name=o.name, lr=o.lr, beta1=o.beta1, beta2=o.beta2,
                                         eps=o.eps, weight_decay=o.weight_decay, fused=o.fused)
        self.guard = NonFiniteGuard(self.optimizer, self.device, cfg.training.max_skipped_steps)
        s = cfg.lr_scheduler
        warmup = fit_warmup(s.warmup_steps, decay_type=s.decay_type, decay_ratio=s.decay_ratio,
                            total_steps=cfg.training.steps)
        if warmup < s.warmup_steps:
            logger.warning("lr_scheduler.warmup_steps (%d) > training.steps (%d): warming up for %d steps",
                           s.warmup_steps, cfg.training.steps, warmup)
        self.lr_scheduler = build_lr_scheduler(self.optimizer, warmup_steps=warmup,
                                               decay_type=s.decay_type, decay_ratio=s.decay_ratio,
                                               min_lr_factor=s.min_lr_factor, total_steps=cfg.training.steps)
        t = cfg.training
        self.loss_fn = build_loss_fn(chunked=t.chunked_ce, chunk_size=t.ce_chunk_size, z_loss_weight=t.z_loss_weight,
                                     aux_loss_weight=t.aux_loss_weight, ponder_loss_weight=t.ponder_loss_weight,
                                     compile=cfg.compile.enable and cfg.compile.loss)

        self.state = TrainState()
        self.checkpointer = CheckpointManager(
            cfg.checkpoint, folder=self.dump_folder / cfg.checkpoint.folder, model=self.model,
            optimizer=self.optimizer, lr_scheduler=self.lr_scheduler, dataloader=self.train_loader,
            train_state=self.state, model_args=self.model_args, model_name=cfg.model.name,
            tokenizer=cfg.tokenizer.name, cpu_group=self.dist.cpu_group, faults=self.faults)
        self.metrics = MetricsLogger(self.dump_folder, enabled=self.is_rank0 or not cfg.metrics.rank_0_only,
                                     tensorboard=cfg.metrics.enable_tensorboard, tb_folder=cfg.metrics.save_tb_folder,
                                     rank=self.dist.rank)
        self._restored = False
        self._stop_signal: int | None = None
        self._skipped_steps = 0  # steps the non-finite guard skipped in this process
        self.tracker: RunTracker | None = None  # rank 0's run database, opened by restore()

    def _build_captured_step(self) -> CapturedMicroStep | None:
        """training.cuda_graph: the micro-step recorded as a CUDA graph (after two eager micro-batches)."""
        if not self.cfg.training.cuda_graph:
            return None
        if self.device.type != "cuda":
            raise ConfigError(f"training.cuda_graph = true needs a CUDA device, but this run is on {self.device}")
        return CapturedMicroStep(self._micro_step, warmup_steps=2)

    def _split_loader(self, windows: PackedWindows, split: str) -> TokenDataLoader:
        d = self.cfg.data
        return split_loader(windows, split=split, val_fraction=0.0 if d.val_path else d.val_fraction,
                            local_batch_size=self.cfg.training.local_batch_size, dp_rank=self.dist.rank,
                            dp_world_size=self.parallel_dims.dp_world_size, seed=self.cfg.job.seed)

    def _val_loader(self, windows: PackedWindows) -> TokenDataLoader | None:
        """The tail of the training windows (data.val_fraction), or all of data.val_path."""
        d = self.cfg.data
        if not d.val_path:
            return self._split_loader(windows, "val") if d.val_fraction > 0 else None
        if d.source not in FILE_SOURCES:
            raise ConfigError(f"data.val_path needs data.source = {' or '.join(map(repr, FILE_SOURCES))}, "
                              f"got {d.source!r}")
        held_out = load_windows(source=d.source, path=d.val_path, tokenizer=self.tokenizer,
                                seq_len=self.cfg.training.seq_len, text_field=d.text_field, hf_name=d.hf_name,
                                hf_split=d.hf_split)
        return heldout_loader(held_out, local_batch_size=self.cfg.training.local_batch_size, dp_rank=self.dist.rank,
                              dp_world_size=self.parallel_dims.dp_world_size)

    # ------------------------------------------------------------------ one step
    def _micro_step(self, inputs: torch.Tensor, labels: torch.Tensor, global_tokens: torch.Tensor,
                    loss_scale: torch.Tensor | None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Forward, loss and backward of one micro-batch (the part `training.cuda_graph` captures).

        Returns the loss parts (the total among them) and the model's routing statistics, detached.
        `loss_scale` multiplies the loss (1 or, for the poison_loss fault, NaN); None skips it."""
        outputs = self.model(inputs)
        loss, parts = self.loss_fn(outputs, labels, global_tokens)
        if loss_scale is not None:
            loss = loss * loss_scale
        # keep the routing statistics, not the [B, S, V] logits: held by the returned result,
        # they would stay allocated through the next micro-batch or step
        stats = {k: v.detach() for k, v in outputs.items() if k != "logits"}
        del outputs
        # FSDP averages gradients over dp ranks; the loss is already a global mean, so undo it
        (loss * float(self.parallel_dims.dp_world_size)).backward()
        return {"total": loss.detach(), **parts}, stats

    def train_step(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Forward/backward over the micro-batches, clip, step (skipped by the guard if the loss or the
        gradient norm is not finite). Returns device tensors (no host sync)."""
        step = self.state.step
        poison = self.faults.poison_loss(step) if self.faults else False
        labels_all = [labels.to(self.device, non_blocking=True) for _, labels in micro_batches]
        global_tokens = all_reduce(sum(count_target_tokens(lab) for lab in labels_all))
        loss_scale = None
        if poison or self.captured_step is not None:  # a captured step always reads its scale
            loss_scale = torch.full((), float("nan") if poison else 1.0, device=self.device)
        run = self.captured_step or self._micro_step
        parts_sum: dict[str, torch.Tensor] = {}
        stats: dict[str, torch.Tensor] = {}
        moe_load = None  # expert loads [MoE layers, E] summed over the micro-batches
        for (inputs, _), labels in zip(micro_batches, labels_all):
            parts, stats = run(inputs.to(self.device, non_blocking=True), labels, global_tokens, loss_scale)
            if "moe_load" in stats:
                moe_load = stats["moe_load"] if moe_load is None else moe_load + stats["moe_load"]
            for key, value in parts.items():
                parts_sum[key] = parts_sum.get(key, 0) + value
        if self.faults:
            self.faults.kill("kill_mid_step", step)
        grad_norm = clip_grad_norm_(self.model.parameters(), self.cfg.training.max_norm)
        self.guard.step(parts_sum["total"], grad_norm, step)
        self.lr_scheduler.step()
        # a captured step adds into the gradients it was recorded with: keep them, zeroed
        self.optimizer.zero_grad(set_to_none=self.captured_step is None)
        if moe_load is not None:
            # the step's global loads (one small device all-reduce, no host sync) move the balancing biases
            stats["moe_load"] = all_reduce(moe_load)
            update_expert_biases(self.moe_layers, stats["moe_load"])
        if self.cfg.float8.enable and self.cfg.float8.enable_fsdp_float8_all_gather and self.captured_step is None:
            # (captured, the scales are computed inside the graph: precomputed ones are new tensors
            # at every step, at addresses the recorded all-gather would not read)
            precompute_float8_scales(self.model)
        return {"parts": parts_sum, "grad_norm": grad_norm, "stats": stats}

    @torch.no_grad()
    def validate(self) -> tuple[float, float]:
        """(mean validation cross-entropy, bits per byte) with evaluation-time (causal) routing.

        Bits per byte = summed nats / ln 2 / UTF-8 bytes of the target tokens, which compares runs
        with different tokenizers."""
        self.model.eval()
        ce_sum = torch.zeros((), device=self.device)
        count = torch.zeros((), device=self.device, dtype=torch.int64)
        n_bytes = torch.zeros((), device=self.device, dtype=torch.int64)
        if self._token_bytes is None:
            self._token_bytes = torch.tensor(self.tokenizer.byte_lengths(), device=self.device)
        with eager_eval():
            for i, (inputs, labels) in enumerate(self.val_loader):
                if i >= self.cfg.validation.steps:
                    break
                labels = labels.to(self.device)
                out = self.model(inputs.to(self.device))
                _, parts = self.loss_fn(out, labels, 1)
                ce_sum += parts["ce"]
                count += count_target_tokens(labels)
                n_bytes += bytes_of_targets(labels, self._token_bytes)
        self.model.train()
        ce_sum, count, n_bytes = all_reduce(ce_sum), all_reduce(count), all_reduce(n_bytes)
        return (ce_sum / count.clamp_min(1)).item(), (ce_sum / math.log(2) / n_bytes.clamp_min(1)).item()

    # ------------------------------------------------------------------ loop
    def _on_signal(self, signum, _frame) -> None:
        logger.warning("received %s: stopping after the current step", signal.Signals(signum).name)
        self._stop_signal = signum

    def _stop_requested(self) -> bool:
        """True on every rank once any rank got SIGTERM/SIGINT, so all ranks stop at the same step.

        The flag is reduced over the CPU (gloo) group: no device sync in the step loop.
        """
        flag = torch.tensor([0 if self._stop_signal is None else 1], dtype=torch.int32)
        return bool(all_reduce(flag, "max", group=self.dist.cpu_group).item())

    def restore(self) -> None:
        """Load the newest complete checkpoint (a mismatching one raises CheckpointError), then save the
        resolved config: a run that cannot start leaves the dump folder as it found it."""
        self.checkpointer.load()
        self._open_tracker()
        self._restored = True
        if self.is_rank0:
            save_config(self.cfg, self.dump_folder / "config.toml")
            logger.info("resolved config saved to %s", self.dump_folder / "config.toml")

    def _open_tracker(self) -> None:
        """Rank 0 opens the run database and its run row (the same row again on a resume). Every rank
        learns whether that worked, so a locked or newer-schema database stops all of them at start-up."""
        m, error = self.cfg.metrics, None
        if self.is_rank0 and m.enable_db:
            t = self.cfg.training
            info = RunInfo(model=self.cfg.model.name, flavor=self.cfg.model.flavor, params=self.params.total,
                           active_params=self.params.active, flops_per_token=self.flops.executed,
                           world_size=self.dist.world_size, config_toml=to_toml(config_to_dict(self.cfg)),
                           tokens_per_step=(t.local_batch_size * t.seq_len * t.gradient_accumulation_steps
                                            * self.parallel_dims.dp_world_size), git_commit=git_commit())
            try:
                self.tracker = RunTracker(self.dump_folder / m.db_file, spike_factor=m.spike_factor,
                                          spike_warmup=m.spike_warmup)
                run_id = self.tracker.start(info, resume_step=self.state.step)
                logger.info("run database %s: run %d", self.tracker.path, run_id)
            except TrackingError as e:
                error = e
        failed = bool(all_reduce(torch.tensor([int(error is not None)]), "max", group=self.dist.cpu_group).item())
        if failed:
            raise error or TrackingError("rank 0 could not open the run database (see its log)")

    def train(self) -> int:
        try:
            code = self._train()
        except BaseException as e:
            if isinstance(e, NonFiniteError):  # every rank stops here together: finish a background save
                self.checkpointer.close()     # in flight (the skipped steps left its weights good)
            if self.tracker is not None:
                self.tracker.finish("failed")
            raise
        if self.tracker is not None:
            self.tracker.finish("completed" if self.state.step >= self.cfg.training.steps else "stopped")
            self.tracker.close()
        return code

    def _train(self) -> int:
        cfg, t = self.cfg, self.cfg.training
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        if not self._restored:
            self.restore()
        data_iter = iter(self.train_loader)
        throughput = Throughput(self.flops.executed, peak_flops(self.device))
        tokens_per_step = t.local_batch_size * t.seq_len * t.gradient_accumulation_steps
        moe_window = None  # expert loads [MoE layers, E] summed since the last log step (device tensor)
        gc.disable()
        restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        if restarts:
            logger.warning("torchrun restart %d (of --max-restarts %s): resuming at step %d", restarts,
                           os.environ.get("TORCHELASTIC_MAX_RESTARTS", "?"), self.state.step)
        logger.info("training %s/%s from step %d to %d on %d rank(s), %s", cfg.model.name, cfg.model.flavor,
                    self.state.step, t.steps, self.dist.world_size, self.device)
        while self.state.step < t.steps and not self._stop_requested():
            self.state.step += 1
            step = self.state.step
            batches = [next(data_iter) for _ in range(t.gradient_accumulation_steps)]
            result = self.train_step(batches)
            self.state.tokens_seen += tokens_per_step * self.parallel_dims.dp_world_size
            throughput.add_tokens(tokens_per_step)
            if "moe_load" in result["stats"]:  # expert loads are reported over the whole log interval
                load = result["stats"]["moe_load"]
                moe_window = load if moe_window is None else moe_window + load
            if step % t.gc_freq == 0:
                gc.collect(1)
            if step % cfg.metrics.log_freq == 0 or step == 1 or step == t.steps:
                if moe_window is not None:
                    result["stats"]["moe_load"], moe_window = moe_window, None
                self._log_step(step, result, throughput)
            if self.val_loader is not None and (step % cfg.validation.freq == 0 or step == t.steps):
                with throughput.paused():  # tokens/s measures training, not evaluation
                    val_loss, val_bpb = self.validate()
                logger.info("step %d  validation loss %.4f  bits/byte %.4f", step, val_loss, val_bpb)
                self.metrics.log(step, {"validation/loss": val_loss, "validation/bpb": val_bpb})
                if self.tracker is not None:
                    self.tracker.log_eval(step, val_loss, val_bpb, self.state.tokens_seen)
            self.checkpointer.maybe_save(step, last_step=step == t.steps)
        if self.state.step < t.steps:  # stopped by a signal: save where we are, then leave cleanly
            self.checkpointer.save(self.state.step, reason="signal")
            logger.warning("stopped by signal at step %d", self.state.step)
        self.checkpointer.close()
        self.metrics.close()
        gc.enable()
        return 0

    def _log_step(self, step: int, result: dict, throughput: Throughput) -> None:
        # one all-reduce and one host copy for every part (the loss function's own total among them)
        names = list(result["parts"])
        summed = all_reduce(torch.stack([result["parts"][k].float() for k in names]))
        parts = dict(zip(names, summed.tolist()))
        loss = parts["total"]
        skips = self.guard.report()
        self._skipped_steps += skips.skipped
        speed = throughput.read()
        scalars = {**{f"loss/{k}": v for k, v in parts.items()},
                   "grad_norm": result["grad_norm"].item(), "lr": self.lr_scheduler.get_last_lr()[0],
                   "throughput/tokens_per_sec_per_device": speed["tokens_per_sec"],
                   "throughput/tflops_per_device": speed["tflops"],
                   "memory/peak_gib": peak_memory_gib(self.device), "train/skipped_steps": self._skipped_steps}
        if "mfu" in speed:
            scalars["throughput/mfu_pct"] = speed["mfu"]
        routing_step = step % self.cfg.metrics.routing_stats_freq == 0 or step == 1
        moe = moe_load_scalars(result["stats"], self.model.moe_layer_ids, per_layer=routing_step)
        scalars.update(moe)
        if routing_step:
            scalars.update(routing_scalars(result["stats"]))
        self.metrics.log(step, scalars)
        spike = self.tracker.log_step(step, scalars, self.state.tokens_seen) if self.tracker is not None else None
        if spike is not None:
            logger.warning("loss spike at step %d: %.4f is %.2fx its short EMA %.4f (recorded in %s)", step,
                           spike.loss, spike.ratio, spike.ema_short, self.tracker.path.name)
        mfu = f"  mfu {speed['mfu']:.1f}%" if "mfu" in speed else ""
        experts = (f"  expert load max/min {moe['moe/load_max_over_min']:.2f} (worst layer)" if moe else "")
        logger.info("step %5d  loss %.4f (ce %.4f aux %.4g ponder %.4g)  grad_norm %.3f  lr %.3e  "
                    "tok/s/dev %.0f%s  mem %.2f GiB%s", step, loss, parts["ce"], parts.get("aux", 0.0),
                    parts.get("ponder", 0.0), scalars["grad_norm"], scalars["lr"], speed["tokens_per_sec"], mfu,
                    scalars["memory/peak_gib"], experts)
        if skips.skipped:
            logger.warning("skipped %d step(s) with a non-finite loss or gradient norm since the last log step "
                           "(the last at step %d; %d in this run): no update, the lr schedule and data moved on",
                           skips.skipped, skips.last_step, self._skipped_steps)
        self.guard.check(skips)


def init_logging(rank: int) -> None:
    log_rank = int(os.environ.get("LOG_RANK", "0"))
    level = logging.INFO if rank == log_rank else logging.WARNING
    logging.basicConfig(level=level, format=f"[rank{rank}] %(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stdout, force=True)


def main(argv: list[str] | None = None) -> None:
    if "--list" in (sys.argv[1:] if argv is None else argv):
        sys.stdout.write(format_model_list())
        return
    init_logging(int(os.environ.get("RANK", "0")))
    cfg = parse_or_exit(argv)
    try:
        trainer = Trainer(cfg)
        trainer.restore()  # a checkpoint of another model (say dense into MoE) is a start-up error
    except (ConfigError, ValueError, FileNotFoundError, ImportError, CheckpointError, TrackingError) as e:
        logger.error("start-up failed: %s", e)
        shutdown_and_exit(2)
        return
    start = time.perf_counter()
    try:
        code = trainer.train()
    except (NonFiniteError, CheckpointError) as e:  # the message says it all; no traceback
        logger.error("training stopped: %s", e)
        code = 1
    except Exception:
        logger.exception("training failed")
        code = 1
    logger.info("done in %.1f s", time.perf_counter() - start)
    shutdown_and_exit(code)


if __name__ == "__main__":
    main()
