"""torchtitan's config registry for hydra_titan models: ``--module torchtitan_patches --config NAME``.

torchtitan 0.3.0 looks ``NAME`` up as a function of this module and trains the
``Trainer.Config`` it returns. Each function is one of hydra_titan's
``train_configs/*.toml`` translated by ``job_config.py``, so the torchtitan
run and the hydra_titan run of the same config agree on model, data, seed
and hyper-parameters. torchtitan's command-line flags override the result
(``--training.steps 20``, ``--router_loss.aux_loss_weight 0.5``, ...).

The debug configs run on a CPU; ``hydra_1B`` and ``llama_1B`` are GPU configs
(bf16, per-block compile, selective AC, async checkpoints).
"""

from __future__ import annotations

from .job_config import load_trainer_config as _load
from .trainer import HydraTrainer as _HydraTrainer


def hydra_debug() -> _HydraTrainer.Config:
    """train_configs/debug.toml: the debug HYDRA (CCGQA + MoD + MoR) on the built-in corpus."""
    return _load("debug.toml")


def hydra_1B() -> _HydraTrainer.Config:
    """train_configs/1B.toml: HYDRA 1B."""
    return _load("1B.toml")


def llama_debug() -> _HydraTrainer.Config:
    """train_configs/llama_debug.toml: the dense baseline at debug size."""
    return _load("llama_debug.toml")


def llama_1B() -> _HydraTrainer.Config:
    """train_configs/llama_1B.toml: the dense baseline at 1B."""
    return _load("llama_1B.toml")


def hybrid_debug() -> _HydraTrainer.Config:
    """train_configs/hybrid_debug.toml: the SSM-attention hybrid (v1) at debug size."""
    return _load("hybrid_debug.toml")


def waaagh_debug() -> _HydraTrainer.Config:
    """train_configs/waaagh_debug.toml: SSM + specialist heads + MoE at debug size."""
    return _load("waaagh_debug.toml")
