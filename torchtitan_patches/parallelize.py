"""torchtitan's ``parallelize_fn`` for hydra_titan models: hydra_titan's own parallelize function.

torchtitan calls ``parallelize_fn(model, parallel_dims=..., training=...,
parallelism=..., compile_config=..., ac_config=..., dump_folder=...)``. This
adapter reads the settings hydra_titan's ``parallelize_decoder`` needs from
those torchtitan sections (mixed precision, FSDP reshard policy, per-block
compile, activation checkpointing), builds hydra_titan's data-parallel mesh,
and applies hydra_titan's float8 -> AC -> compile -> FSDP2 order to the
decoder inside the :class:`~torchtitan_patches.model.HydraTitanModel`.

One difference from hydra_titan's trainer is handled here: torchtitan's loss
is a per-rank sum divided by the *global* token count, so gradients must be
summed over data-parallel ranks, not averaged. hydra_titan's trainer keeps
FSDP's average and scales its loss by the DP degree instead; here every FSDP
unit is set to reduce by a plain sum (:func:`sum_gradients`), which gives the
same gradients. (torchtitan's own ``disable_fsdp_gradient_division`` sets a
divide factor of 1, which FSDP turns into a ``PREMUL_SUM`` reduction that gloo
cannot run; forcing sum reductions as well keeps it a ``SUM`` on any backend.)

Only data parallelism (FSDP2 / HSDP) is bridged: tensor, context, pipeline and
expert parallel degrees above 1 are refused at start-up, as are activation
checkpointing policies hydra_titan does not have (memory-budget AC).
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.distributed.fsdp import FSDPModule
from torchtitan.config import CompileConfig, ParallelismConfig, TrainingConfig
from torchtitan.distributed import ParallelDims as TitanParallelDims
from torchtitan.distributed.activation_checkpoint import FullAC, SelectiveAC
from torchtitan.tools import utils as titan_utils

from hydra_titan.config.job_config import ActivationCheckpoint, Compile, JobConfig, Parallelism, Training
from hydra_titan.distributed import ParallelDims, parallelize_decoder

from .model import HydraTitanModel

# torchtitan's AC config class -> hydra_titan's activation_checkpoint.mode (None: torchtitan's "none")
AC_MODES: dict[type | None, str] = {type(None): "none", FullAC.Config: "full", SelectiveAC.Config: "selective"}


def _ac_mode(ac_config: Any) -> str:
    try:
        return AC_MODES[type(ac_config)]
    except KeyError:
        raise ValueError(f"activation checkpointing {type(ac_config).__qualname__} is not bridged to hydra_titan "
                         "models; use full, selective or none") from None


def _check_data_parallel_only(parallel_dims: TitanParallelDims) -> None:
    others = {"tensor_parallel_degree": parallel_dims.tp, "context_parallel_degree": parallel_dims.cp,
              "pipeline_parallel_degree": parallel_dims.pp, "expert_parallel_degree": parallel_dims.ep}
    unsupported = {name: degree for name, degree in others.items() if degree > 1}
    if unsupported:
        raise ValueError(f"hydra_titan models are parallelized by FSDP2/HSDP only; set parallelism."
                         f"{', parallelism.'.join(f'{k} = 1 (got {v})' for k, v in unsupported.items())}")


def sum_gradients(model: nn.Module) -> None:
    """Every FSDP unit of ``model`` sums gradients over its data-parallel ranks (no division)."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # a SUM, not PREMUL_SUM(1): gloo has no PREMUL_SUM


def job_config_for_parallelize(*, training: TrainingConfig, parallelism: ParallelismConfig,
                               compile_config: CompileConfig, ac_config: Any) -> JobConfig:
    """The hydra_titan JobConfig sections ``parallelize_decoder`` reads, from torchtitan's."""
    return JobConfig(
        training=Training(mixed_precision_param=training.mixed_precision_param,
                          mixed_precision_reduce=training.mixed_precision_reduce),
        parallelism=Parallelism(fsdp_reshard_after_forward=parallelism.fsdp_reshard_after_forward),
        activation_checkpoint=ActivationCheckpoint(mode=_ac_mode(ac_config)),
        compile=Compile(enable=compile_config.enable and "model" in compile_config.components),
    )


def parallelize_hydra(model: HydraTitanModel, *, parallel_dims: TitanParallelDims, training: TrainingConfig,
                      parallelism: ParallelismConfig, compile_config: CompileConfig, ac_config: Any,
                      dump_folder: str = "", **kwargs: Any) -> nn.Module:
    """torchtitan's ``ModelSpec.parallelize_fn``: hydra_titan's parallelize on ``model.model``."""
    del dump_folder, kwargs
    _check_data_parallel_only(parallel_dims)
    cfg = job_config_for_parallelize(training=training, parallelism=parallelism, compile_config=compile_config,
                                     ac_config=ac_config)
    dims = ParallelDims.resolve(parallel_dims.dp_replicate, parallel_dims.dp_shard, parallel_dims.world_size)
    mesh = dims.build_mesh(titan_utils.device_type)
    spec = model.config.spec
    parallelize = spec.parallelize_fn or parallelize_decoder
    model.model = parallelize(model.model, parallel_dims=dims, mesh=mesh, cfg=cfg, options=spec.parallelize_options)
    sum_gradients(model)
    return model
