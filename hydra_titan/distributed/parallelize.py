"""The one parallelize function for every model that keeps the decoder contract.

Order matters (DESIGN §5): float8 conversion on the meta model, activation
checkpointing per block, torch.compile per block, then FSDP2 per block,
embeddings, norm + head and root. Per-model differences arrive as
`ParallelizeOptions` from the model's spec, never as a copy of this function.
"""

from __future__ import annotations

import logging

from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from ..config.job_config import JobConfig
from ..models.registry import ParallelizeOptions
from .activation_checkpoint import apply_activation_checkpointing
from .compile import apply_compile
from .float8 import convert_to_float8
from .fsdp import apply_fsdp
from .parallel_dims import ParallelDims

logger = logging.getLogger(__name__)

DECODER_CONTRACT = ("tok_embeddings", "layers", "norm", "output", "init_weights", "init_buffers")


def check_decoder_contract(model: nn.Module) -> None:
    missing = [name for name in DECODER_CONTRACT if not hasattr(model, name)]
    if missing or not isinstance(getattr(model, "layers", None), nn.ModuleDict):
        raise TypeError(f"{type(model).__name__} does not keep the decoder contract: needs {DECODER_CONTRACT} "
                        f"with `layers` an nn.ModuleDict; missing {missing}")


def parallelize_decoder(model: nn.Module, *, parallel_dims: ParallelDims, mesh: DeviceMesh, cfg: JobConfig,
                        options: ParallelizeOptions) -> nn.Module:
    check_decoder_contract(model)
    if cfg.float8.enable:
        convert_to_float8(model, recipe=cfg.float8.recipe, emulate=cfg.float8.emulate,
                          fsdp_float8_all_gather=cfg.float8.enable_fsdp_float8_all_gather,
                          skip_fqns=options.float8_skip_fqns + tuple(cfg.float8.filter_fqns),
                          min_dim=cfg.float8.min_dim)
    apply_activation_checkpointing(model, cfg.activation_checkpoint.mode, options.ac_extra_save_ops)
    if cfg.compile.enable:
        apply_compile(model, fullgraph=cfg.compile.fullgraph, inductor_options=cfg.compile.inductor_options)
    apply_fsdp(model, parallel_dims.fsdp_mesh(mesh), param_dtype=cfg.training.mixed_precision_param,
               reduce_dtype=cfg.training.mixed_precision_reduce,
               reshard_after_forward=cfg.parallelism.fsdp_reshard_after_forward)
    logger.info("parallelized %s: float8=%s ac=%s compile=%s fsdp mesh=%s", type(model).__name__,
                cfg.float8.enable, cfg.activation_checkpoint.mode, cfg.compile.enable,
                "HSDP (dp_replicate, dp_shard)" if parallel_dims.hsdp else "dp_shard")
    return model
