"""Parallelism changes nothing but speed and memory: loss parity across layouts on CPU (gloo)."""

from __future__ import annotations

import pytest
import torch

from helpers import TINY_MODEL, TINY_RUN, losses, run_trainer

FP32 = ["--training.mixed_precision_param", "float32", "--validation.enable", "false"]
STEPS = ["--training.steps", "5"]


def train(tmp_path, name: str, extra: list[str], nproc: int = 1, batch: int = 4) -> list[float]:
    proc = run_trainer([*TINY_RUN, *TINY_MODEL, *FP32, *STEPS, "--training.local_batch_size", str(batch), *extra],
                       tmp_path / name, nproc=nproc)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = losses(tmp_path / name)
    assert len(out) == 5
    return out


@pytest.mark.parametrize("model", ["hydra", "llama"])
def test_single_process_fsdp2_and_hsdp_agree(tmp_path, model):
    """Same global batch (4 sequences) on 1 rank, FSDP over 2 ranks, HSDP 2 replicas x 1 shard."""
    name = ["--model.name", model]
    single = train(tmp_path, "single", name)
    fsdp = train(tmp_path, "fsdp", name, nproc=2, batch=2)
    hsdp = train(tmp_path, "hsdp", [*name, "--parallelism.dp_replicate", "2", "--parallelism.dp_shard", "1"],
                 nproc=2, batch=2)
    torch.testing.assert_close(torch.tensor(fsdp), torch.tensor(single), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(hsdp), torch.tensor(single), atol=1e-5, rtol=0)


def test_activation_checkpointing_changes_nothing(tmp_path):
    base = train(tmp_path, "none", [], nproc=2, batch=2)
    for mode in ("full", "selective"):
        with_ac = train(tmp_path, mode, ["--activation_checkpoint.mode", mode], nproc=2, batch=2)
        assert with_ac == base, mode  # bitwise: recomputation replays the same ops


def test_compiled_blocks_match_eager(tmp_path, monkeypatch):
    eager = train(tmp_path, "eager", [])
    compiled = train(tmp_path, "compiled", ["--compile.enable", "true"])
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), atol=1e-4, rtol=0)


def test_emulated_float8_trains(tmp_path):
    # dim 128 so the block linears qualify (multiples of 16, >= 16); emulated on CPU
    f8 = train(tmp_path, "f8", ["--float8.enable", "true", "--float8.emulate", "true"])
    ref = train(tmp_path, "bf", [])
    assert all(torch.isfinite(torch.tensor(f8)))
    assert f8 != ref  # float8 really changed the matmuls
    torch.testing.assert_close(torch.tensor(f8), torch.tensor(ref), atol=0.05, rtol=0)


@pytest.mark.parametrize("args,needle", [
    (["--parallelism.dp_replicate", "2", "--parallelism.dp_shard", "2"], "world size"),
    (["--parallelism.dp_replicate", "3"], "dp_replicate"),
])
def test_bad_layouts_fail_at_start_up(tmp_path, args, needle):
    proc = run_trainer([*TINY_RUN, *TINY_MODEL, *STEPS, *args], tmp_path, nproc=2)
    assert proc.returncode != 0
    assert needle in proc.stdout + proc.stderr


def test_float8_without_cuda_needs_emulation(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the start-up check does not apply")
    proc = run_trainer([*TINY_RUN, *TINY_MODEL, *STEPS, "--float8.enable", "true"], tmp_path)
    assert proc.returncode == 2
    assert "float8.emulate" in proc.stdout + proc.stderr
