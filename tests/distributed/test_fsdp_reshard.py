"""FSDP2 reshard-after-forward policy: what stays gathered once forward is done (1-rank gloo group)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from hydra_titan.distributed.fsdp import apply_fsdp
from hydra_titan.models import get_model_spec


@pytest.fixture
def one_rank_group():
    if dist.is_initialized():
        pytest.skip("needs a process without a default process group")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def _gathered_after_forward(mesh, policy: str) -> list[bool]:
    """Per block: is its weight still the gathered (plain) tensor after a forward?"""
    model = get_model_spec("llama").build("debug", vocab_size=64, dim=32, n_layers=3, n_heads=2,
                                           n_kv_heads=1, head_dim=16)
    model.init_weights()
    apply_fsdp(model, mesh, param_dtype="float32", reshard_after_forward=policy)
    model(torch.randint(0, 64, (1, 8)))
    return [not isinstance(block.attention_norm.weight, DTensor) for block in model.layers.values()]


@pytest.mark.parametrize("policy,expected", [
    ("default", [True, True, True]),    # one rank: nothing to free but a copy, so nothing is resharded
    ("always", [False, False, False]),
    ("never", [True, True, True]),
])
def test_reshard_policy_on_one_rank(one_rank_group, policy, expected):
    assert _gathered_after_forward(one_rank_group, policy) == expected
