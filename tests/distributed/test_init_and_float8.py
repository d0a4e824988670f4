"""Meta-device init under FSDP equals single-process init; float8 converts the intended linears."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from helpers import REPO

from hydra_titan.distributed.float8 import convert_to_float8, float8_module_filter
from hydra_titan.models import get_model_spec

WORKER = Path(__file__).with_name("init_worker.py")


def run_worker(model: str, mode: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--rdzv_backend",
                           "c10d", "--rdzv_endpoint", "localhost:0", str(WORKER), model, mode], cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.parametrize("model", ["hydra", "llama"])
def test_meta_init_under_fsdp_equals_single_process_init(model):
    assert "RESULT equal" in run_worker(model, "full")


def test_sharded_init_mode_is_not_layout_independent_on_cpu():
    """Why `full` is the default: DTensor shards initialised in place differ from the plain init on CPU."""
    assert "RESULT different" in run_worker("hydra", "sharded")


def meta_hydra(**overrides):
    spec = get_model_spec("hydra")
    args = spec.args("debug", **{"vocab_size": 256, "dim": 128, "n_heads": 2, "head_dim": 32, **overrides})
    with torch.device("meta"):
        return spec.model_cls(args), spec


def test_float8_filter_skips_routers_head_and_odd_dims():
    keep = float8_module_filter(("output", "router"))
    assert keep(nn.Linear(128, 256), "layers.0.mor.block.feed_forward.w1")
    assert not keep(nn.Linear(128, 1), "layers.0.mod.router")
    assert not keep(nn.Linear(128, 256), "output")
    assert not keep(nn.Linear(120, 256), "layers.0.x")   # 120 is not a multiple of 16
    assert not keep(nn.Linear(128, 8), "layers.0.y")     # too small
    assert not keep(nn.Conv1d(16, 16, 1), "layers.0.conv")


def test_float8_converts_exactly_the_block_linears():
    pytest.importorskip("torchao")
    from torchao.float8.float8_linear import Float8Linear

    model, spec = meta_hydra()
    converted = convert_to_float8(model, recipe="tensorwise", emulate=True, fsdp_float8_all_gather=False,
                                  skip_fqns=spec.parallelize_options.float8_skip_fqns)
    f8 = {name for name, m in model.named_modules() if isinstance(m, Float8Linear)}
    assert f8 == set(converted)
    expected = {f"layers.{i}.mor.block.{part}" for i in range(2)
                for part in ("attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w2",
                             "feed_forward.w3")}
    assert f8 == expected
    assert not any("router" in n or n == "output" for n in f8)


def test_float8_rowwise_recipe_converts_too():
    pytest.importorskip("torchao")
    model, spec = meta_hydra()
    converted = convert_to_float8(model, recipe="rowwise", emulate=True, fsdp_float8_all_gather=False,
                                  skip_fqns=spec.parallelize_options.float8_skip_fqns)
    assert len(converted) == 10


def test_float8_min_dim_and_extra_filters_keep_small_and_named_linears_in_bf16():
    """float8.min_dim / float8.filter_fqns: at dim 256 with two 64-wide query heads, `wo` (128 -> 256)
    is below min_dim 256 and stays bf16, and so does what the extra filter names (w3)."""
    pytest.importorskip("torchao")
    model, spec = meta_hydra(dim=256, n_heads=2, head_dim=64)
    converted = convert_to_float8(model, recipe="tensorwise", emulate=True, fsdp_float8_all_gather=False,
                                  skip_fqns=spec.parallelize_options.float8_skip_fqns + ("w3",), min_dim=256)
    assert sorted(converted) == [f"layers.{i}.mor.block.{part}" for i in range(2)
                                 for part in ("attention.wqkv", "feed_forward.w1", "feed_forward.w2")]


def test_float8_all_gather_needs_tensorwise():
    pytest.importorskip("torchao")
    model, spec = meta_hydra()
    with pytest.raises(ValueError, match="tensorwise"):
        convert_to_float8(model, recipe="rowwise", emulate=True, fsdp_float8_all_gather=True,
                          skip_fqns=spec.parallelize_options.float8_skip_fqns)


def _aten_calls_in_step(model: nn.Module, op) -> int:
    """How many times `op` runs in one forward + backward of `model`."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.calls += func is op
            return func(*args, **(kwargs or {}))

    tokens = torch.randint(0, model.args.vocab_size, (2, 32))
    with Count():
        model(tokens)["logits"].float().square().mean().backward()
    return Count.calls


def test_selective_ac_does_not_recompute_float8_amax():
    """The tensorwise amax (aten.max) is saved by selective AC: backward recomputes no amax pass."""
    pytest.importorskip("torchao")
    from hydra_titan.distributed.activation_checkpoint import apply_activation_checkpointing

    counts = {}
    for mode in ("none", "selective", "full"):
        torch.manual_seed(0)
        model, spec = meta_hydra()
        convert_to_float8(model, recipe="tensorwise", emulate=True, fsdp_float8_all_gather=False,
                          skip_fqns=spec.parallelize_options.float8_skip_fqns)
        model.to_empty(device="cpu")
        model.init_weights()
        apply_activation_checkpointing(model, mode)
        counts[mode] = _aten_calls_in_step(model, torch.ops.aten.max.default)
    assert counts["none"] > 0
    assert counts["selective"] == counts["none"] < counts["full"]
