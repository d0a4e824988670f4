"""Weight initialisation of a sharded model that does not depend on the layout.

Random init of DTensor shards is not guaranteed to reproduce the unsharded
init (on CPU meshes it does not): the same seed would give different weights
on 1 and 2 ranks, and loss parity across layouts would be lost from step 0.
`full` mode initialises an unsharded twin with the job seed and loads it into
the shards, so every layout (1 process, FSDP, HSDP) starts from the same
weights as a plain single-process model. It costs one transient full copy of
the model per rank; `sharded` mode skips that (and the guarantee). For
multi-thousand-GPU runs, a seed checkpoint is the other way to the same end.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict


def init_model_weights(model: nn.Module, *, build_unsharded: Callable[[], nn.Module], device: torch.device,
                       mode: str, seed: int) -> None:
    if mode == "sharded":
        model.init_weights(buffer_device=device)
        return
    if mode != "full":
        raise ValueError(f"parallelism.init_mode must be full | sharded, got {mode!r}")
    model.init_buffers(device)  # the weights come from the twin below
    with torch.device("meta"):
        twin = build_unsharded()
    twin.to_empty(device=device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        twin.init_weights(buffer_device=device)
    set_model_state_dict(model, twin.state_dict(), options=StateDictOptions(full_state_dict=True, strict=True))
    del twin
