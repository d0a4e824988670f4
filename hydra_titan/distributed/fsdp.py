"""FSDP2 `fully_shard`: per block, then embeddings, then norm + head, then the root.

A MoR block is one unit: its recursion loop runs inside it, so its shared
weights are all-gathered once per forward however many recursions run.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, *, param_dtype: str = "bfloat16",
               reduce_dtype: str = "float32", reshard_after_forward: str = "default") -> None:
    mp = MixedPrecisionPolicy(param_dtype=DTYPES[param_dtype], reduce_dtype=DTYPES[reduce_dtype])
    # Blocks receive activations already in param_dtype (the embedding's output); not casting
    # their inputs keeps the fp32 RoPE table that is passed to every block in fp32.
    block_mp = MixedPrecisionPolicy(param_dtype=DTYPES[param_dtype], reduce_dtype=DTYPES[reduce_dtype],
                                    cast_forward_inputs=False)
    if reshard_after_forward == "default" and mesh.shape[-1] == 1:
        # shard groups of one rank (one process, or HSDP with dp_shard = 1): resharding frees only the
        # bf16 copy of the weights, and backward then pays a second cast + copy to gather them again
        reshard_after_forward = "never"
    blocks = list(model.layers.values())
    for i, block in enumerate(blocks):
        # "default": keep the last block gathered, backward needs it right away
        reshard = {"always": True, "never": False, "default": i < len(blocks) - 1}[reshard_after_forward]
        fully_shard(block, mesh=mesh, mp_policy=block_mp, reshard_after_forward=reshard)
    fully_shard(model.tok_embeddings, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward != "never")
    fully_shard([model.norm, model.output], mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward != "never")
