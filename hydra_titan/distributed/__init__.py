"""Parallelism applied from outside the model: float8, AC, compile, FSDP2/HSDP."""

from .parallel_dims import ParallelDims
from .parallelize import parallelize_decoder
from .utils import DistInfo, all_reduce, clip_grad_norm_, init_distributed, resolve_device_type, shutdown_and_exit

__all__ = ["ParallelDims", "parallelize_decoder", "DistInfo", "all_reduce", "clip_grad_norm_",
           "init_distributed", "resolve_device_type", "shutdown_and_exit"]
