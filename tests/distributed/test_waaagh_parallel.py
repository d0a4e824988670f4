"""The Waaagh family through the stack on CPU (gloo): FSDP over 2 ranks == 1 rank, a bitwise DCP
resume, and the MoE load statistics in the logged metrics."""

from __future__ import annotations

import json
import shutil

import torch

from helpers import losses, run_trainer

TINY_WAAAGH = ["--config", "train_configs/waaagh_debug.toml", "--training.seq_len", "64", "--metrics.log_freq", "1",
               "--metrics.enable_tensorboard", "false", "--lr_scheduler.warmup_steps", "2",
               "--training.mixed_precision_param", "float32", "--validation.enable", "false",
               "--model.overrides.dim", "64", "--model.overrides.n_heads", "2", "--model.overrides.n_layers", "2",
               "--model.overrides.ssm_head_dim", "16", "--model.overrides.ssm_state_dim", "16",
               "--model.overrides.ssm_chunk_size", "16", "--model.overrides.window", "8",
               "--model.overrides.sparse_k", "4", "--model.overrides.memory_slots", "8"]


def train(tmp_path, name, extra, nproc=1, batch=4, steps=5):
    proc = run_trainer([*TINY_WAAAGH, "--training.steps", str(steps), "--training.local_batch_size", str(batch),
                        *extra], tmp_path / name, nproc=nproc)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 or ("done in" in out and "terminate called" in out), out[-4000:]
    return out


def metrics(dump):
    rows = [json.loads(line) for line in (dump / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "loss/ce" in r}


def test_two_rank_fsdp_matches_one_rank(tmp_path):
    train(tmp_path, "single", [])
    train(tmp_path, "fsdp", [], nproc=2, batch=2)
    single, fsdp = losses(tmp_path / "single"), losses(tmp_path / "fsdp")
    assert len(single) == 5
    torch.testing.assert_close(torch.tensor(fsdp), torch.tensor(single), atol=1e-5, rtol=0)
    # the MoE's expert loads are logged like every MoE family's
    assert any(key.startswith("moe/") for key in metrics(tmp_path / "single")[5])


def test_dcp_resume_is_bitwise(tmp_path):
    """2 ranks: 8 steps straight == the run stopped at step 4, resumed to 8 (expert biases included)."""
    ckpt = ["--checkpoint.enable", "true", "--checkpoint.interval", "4"]
    train(tmp_path, "straight", ckpt, nproc=2, batch=2, steps=8)
    (tmp_path / "resumed" / "checkpoint").mkdir(parents=True)
    shutil.copytree(tmp_path / "straight" / "checkpoint" / "step-4", tmp_path / "resumed" / "checkpoint" / "step-4")
    out = train(tmp_path, "resumed", ckpt, nproc=2, batch=2, steps=8)
    assert "resuming at step 4" in out
    want, got = metrics(tmp_path / "straight"), metrics(tmp_path / "resumed")
    for step in range(5, 9):
        for key in ("loss/ce", "loss/total", "grad_norm", "lr"):
            assert got[step][key] == want[step][key], (step, key)
