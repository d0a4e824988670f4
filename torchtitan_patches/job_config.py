"""A hydra_titan TOML job config, translated into torchtitan's ``Trainer.Config``.

The bridge's configs are hydra_titan's own ``train_configs/*.toml`` files, so a
torchtitan run and a hydra_titan run of the same name use the same model,
data, seed, batch, precision and optimizer settings by construction, and
nothing is written twice. Every TOML section maps onto torchtitan's sections
(field by field below). What has no torchtitan counterpart in this bridge is
refused with a message rather than dropped: float8 (torchtitan converts its
own Linear configs, not our modules), z-loss and chunked cross-entropy
(torchtitan's loss sees only logits), gradient accumulation by count
(torchtitan takes ``--training.global_batch_size`` instead), and the 8-bit /
Muon optimizers. Periodic validation and the run database stay with
hydra_titan's trainer; the torchtitan run trains and checkpoints.

The torchtitan run writes to ``<job.dump_folder>_torchtitan`` so that it
never mixes its checkpoints with a hydra_titan run's.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torchtitan.components.loss import CrossEntropyLoss
from torchtitan.components.metrics import MetricsProcessor
from torchtitan.components.optimizer import LRSchedulersContainer, ParamGroupConfig
from torchtitan.config import CompileConfig, DebugConfig, ParallelismConfig, TrainingConfig
from torchtitan.distributed.activation_checkpoint import FullAC, SelectiveAC

import hydra_titan
from hydra_titan.config import ConfigError, JobConfig, load_config

from .checkpoint import HydraCheckpointManager
from .dataloader import HydraDataLoader
from .model_spec import hydra_model_spec
from .optimizer import HydraOptimizersContainer
from .router_loss import RouterLoss
from .tokenizer import HydraTokenizer
from .trainer import HydraTrainer

ASSETS = Path(hydra_titan.__file__).parent / "assets"  # torchtitan's hf_assets_path: the shipped BPE lives here
DUMP_SUFFIX = "_torchtitan"

# hydra_titan lr_scheduler.decay_type -> torchtitan's decay shape (wsd: linear over the last decay_ratio;
# constant: a "decay" to 1.0)
DECAY_TYPES = {"cosine": "cosine", "linear": "linear", "wsd": "linear", "constant": "linear"}
# hydra_titan activation_checkpoint.mode -> torchtitan's policy config (None: no AC)
AC_POLICIES = {"none": lambda: None, "full": FullAC.Config, "selective": SelectiveAC.Config}


def _refuse_unbridged(job: JobConfig) -> None:
    t = job.training
    refused = {
        "float8.enable": (job.float8.enable, "torchtitan's float8 converts its own Linear configs"),
        "training.z_loss_weight": (t.z_loss_weight != 0, "torchtitan's loss sees only the logits"),
        "training.chunked_ce": (t.chunked_ce, "use torchtitan's loss (compile it with --compile.components loss)"),
        "training.gradient_accumulation_steps": (t.gradient_accumulation_steps != 1,
                                                 "set torchtitan's --training.global_batch_size instead"),
        "optimizer.name": (job.optimizer.name != "adamw", "only AdamW is bridged"),
    }
    found = [f"{key} ({why})" for key, (bad, why) in refused.items() if bad]
    if found:
        raise ConfigError(f"not bridged to torchtitan: {'; '.join(found)}")


def _lr_scheduler(job: JobConfig) -> LRSchedulersContainer.Config:
    """Warmup then decay. torchtitan's warmup ramps as (i+1)/warmup where hydra_titan's ramps as
    (i+1)/(warmup+1), so the two lr curves differ slightly after step 1 (step 1's loss does not see it)."""
    s = job.lr_scheduler
    return LRSchedulersContainer.Config(
        warmup_steps=s.warmup_steps, decay_type=DECAY_TYPES[s.decay_type],
        decay_ratio=s.decay_ratio if s.decay_type == "wsd" else None,  # None: decay from the end of warmup
        min_lr_factor=1.0 if s.decay_type == "constant" else s.min_lr_factor)


def trainer_config(job: JobConfig) -> HydraTrainer.Config:
    """torchtitan's trainer config for the run ``job`` describes (ConfigError for what is not bridged)."""
    _refuse_unbridged(job)
    t, o, d, c = job.training, job.optimizer, job.data, job.checkpoint
    adamw = {"lr": o.lr, "betas": (o.beta1, o.beta2), "eps": o.eps, "weight_decay": o.weight_decay}
    return HydraTrainer.Config(
        model_spec=hydra_model_spec(job.model.name, job.model.flavor, job.model.overrides,
                                    init_mode=job.parallelism.init_mode),
        hf_assets_path=str(ASSETS),
        dump_folder=job.job.dump_folder.rstrip("/") + DUMP_SUFFIX,
        tokenizer=HydraTokenizer.Config(name=job.tokenizer.name),
        dataloader=HydraDataLoader.Config(dataset=d.source, dataset_path=d.path or None, text_field=d.text_field,
                                          hf_name=d.hf_name, hf_split=d.hf_split, seed=job.job.seed,
                                          # with a separate val_path, hydra_titan trains on all of data.path
                                          val_fraction=0.0 if d.val_path else d.val_fraction),
        training=TrainingConfig(local_batch_size=t.local_batch_size, seq_len=t.seq_len, max_norm=t.max_norm,
                                steps=t.steps, mixed_precision_param=t.mixed_precision_param,
                                mixed_precision_reduce=t.mixed_precision_reduce, gc_freq=t.gc_freq),
        loss=CrossEntropyLoss.Config(),
        router_loss=RouterLoss.Config(aux_loss_weight=t.aux_loss_weight, ponder_loss_weight=t.ponder_loss_weight),
        optimizer=HydraOptimizersContainer.Config(
            param_groups=[ParamGroupConfig(pattern=".*", optimizer_name="AdamW", optimizer_kwargs=adamw)],
            implementation="foreach" if o.fused == "false" else "fused"),
        lr_scheduler=_lr_scheduler(job),
        parallelism=ParallelismConfig(data_parallel_replicate_degree=job.parallelism.dp_replicate,
                                      data_parallel_shard_degree=job.parallelism.dp_shard,
                                      fsdp_reshard_after_forward=job.parallelism.fsdp_reshard_after_forward),
        activation_checkpoint=AC_POLICIES[job.activation_checkpoint.mode](),
        compile=CompileConfig(enable=job.compile.enable,
                              components=["model", "loss"] if job.compile.loss else ["model"]),
        checkpoint=HydraCheckpointManager.Config(
            enable=c.enable, folder=c.folder, interval=c.interval, async_mode=c.async_mode,
            keep_latest_k=c.keep_latest_k, load_step=c.load_step, exclude_from_loading=list(c.exclude_from_loading),
            initial_load_path=c.initial_load_path or None, last_save_model_only=c.last_save_model_only,
            export_dtype=c.export_dtype),
        metrics=MetricsProcessor.Config(log_freq=job.metrics.log_freq,
                                        enable_tensorboard=job.metrics.enable_tensorboard,
                                        save_tb_folder=job.metrics.save_tb_folder),
        debug=DebugConfig(seed=job.job.seed, deterministic=job.job.deterministic),
    )


def load_trainer_config(config: str, overrides: Sequence[str] = ()) -> HydraTrainer.Config:
    """``trainer_config`` of a TOML in ``train_configs/`` (a name or a path), with hydra_titan-style
    ``--section.key value`` overrides applied first."""
    return trainer_config(load_config(["--config", config, *overrides]))
