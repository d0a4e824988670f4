"""MoE through the real trainer and scripts on CPU: start-up errors, checkpoints, the diagnostic."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import REPO, TINY_MODEL, TINY_RUN, losses, run_trainer

MOE = ["--model.overrides.moe_num_experts", "4"]
SHORT = ["--training.steps", "4", "--validation.enable", "false", "--training.local_batch_size", "4"]


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folder` with its size and mtime: to show a failed run touched nothing."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("args,needle", [
    (["--model.overrides.moe_top_k", "5"], "moe_top_k"),
    (["--model.overrides.moe_hidden_dim", "100"], "moe_hidden_dim"),  # breaks grouped_mm's 16-byte strides
    (["--model.overrides.moe_balance", "switch"], "moe_balance"),
])
def test_bad_moe_settings_exit_2_naming_the_argument(tmp_path, args, needle):
    proc = run_trainer([*TINY_RUN, *TINY_MODEL, *SHORT, *MOE, *args], tmp_path)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert needle in proc.stdout + proc.stderr
    assert not tmp_path.exists() or not any(tmp_path.iterdir())  # nothing written


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory) -> Path:
    dump = tmp_path_factory.mktemp("dense")
    proc = run_trainer([*TINY_RUN, *TINY_MODEL, *SHORT, "--checkpoint.enable", "true", "--checkpoint.interval", "2"],
                       dump)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return dump


def test_dense_checkpoint_into_a_moe_model_exits_2_and_touches_nothing(dense_run, tmp_path):
    dump = tmp_path / "run"
    shutil.copytree(dense_run, dump)
    before = snapshot(dump)
    proc = run_trainer([*TINY_RUN, *TINY_MODEL, *SHORT, *MOE, "--checkpoint.enable", "true"], dump)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert "does not fit the model" in out and "moe_num_experts: checkpoint 0 vs this run 4" in out
    assert snapshot(dump) == before  # config.toml, metrics, checkpoints: all as they were


def test_moe_resume_is_bitwise_with_the_expert_biases(tmp_path):
    """2-rank FSDP: 6 steps, stop, resume to 10 == 10 straight (losses, grad norms, and the biases)."""
    common = [*TINY_RUN, *TINY_MODEL, *MOE, "--training.steps", "10", "--validation.enable", "false",
              "--training.local_batch_size", "2", "--training.mixed_precision_param", "float32",
              "--checkpoint.enable", "true", "--checkpoint.interval", "3"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run_trainer(common, straight, nproc=2).returncode == 0
    (resumed / "checkpoint").mkdir(parents=True)
    shutil.copytree(straight / "checkpoint" / "step-6", resumed / "checkpoint" / "step-6")
    proc = run_trainer(common, resumed, nproc=2)
    assert proc.returncode == 0 and "resuming at step 6" in proc.stdout + proc.stderr
    for key in ("loss/ce", "loss/total", "grad_norm", "moe/load_max_over_min"):
        assert losses(resumed, key) == losses(straight, key)[-len(losses(resumed, key)):], key
    weights = [load_weights(d / "checkpoint" / "step-10") for d in (straight, resumed)]
    biases = [k for k in weights[0] if k.endswith("expert_bias")]
    assert len(biases) == 2  # both blocks of the debug HYDRA carry experts
    for key in biases:
        assert weights[0][key].abs().sum() > 0, key  # the biases really moved
        assert torch.equal(weights[0][key], weights[1][key]), key


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    from hydra_titan.components.checkpoint import load_model_weights

    return load_model_weights(path)


def test_moe_two_ranks_match_one(tmp_path):
    args = [*TINY_RUN, *TINY_MODEL, *MOE, "--training.steps", "5", "--validation.enable", "false",
            "--training.mixed_precision_param", "float32"]
    assert run_trainer([*args, "--training.local_batch_size", "4"], tmp_path / "one").returncode == 0
    assert run_trainer([*args, "--training.local_batch_size", "2"], tmp_path / "two", nproc=2).returncode == 0
    for key in ("loss/ce", "moe/load_max_over_min"):
        torch.testing.assert_close(torch.tensor(losses(tmp_path / "two", key)),
                                   torch.tensor(losses(tmp_path / "one", key)), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- the diagnostic

def specialization(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "scripts/moe_specialization.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "2"})


def test_specialization_report_of_a_moe_llama(tmp_path):
    dump = tmp_path / "run"
    proc = run_trainer([*TINY_RUN, *TINY_MODEL, *SHORT, "--model.name", "llama", *MOE,
                        "--model.overrides.moe_top_k", "2", "--checkpoint.enable", "true"], dump)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    png, report = tmp_path / "heat.png", tmp_path / "moe.json"
    proc = specialization("--checkpoint", str(dump / "checkpoint"), "--seq-len", "64", "--batches", "2",
                          "--png", str(png), "--json", str(report))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "layer 1:" in proc.stdout and "| expert | share |" in proc.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(report.read_text())
    assert [layer["layer"] for layer in data["layers"]] == [0, 1]
    for layer in data["layers"]:
        rows = layer["experts"]
        assert sum(r["slots"] for r in rows) == 2 * 4 * 64 * 2  # every token's 2 slots: dropless
        assert sum(r["share"] for r in rows) == pytest.approx(1.0)
        assert 0 < layer["load_entropy"] <= 1 and 0 < layer["token_routing_entropy"] <= 1
        for r in rows:
            assert sum(t["count"] for t in r["top_tokens"]) <= r["slots"]
            assert all(isinstance(t["token"], str) for t in r["top_tokens"])


def test_specialization_refuses_a_dense_checkpoint(dense_run):
    proc = specialization("--checkpoint", str(dense_run / "checkpoint"), "--png", "")
    assert proc.returncode == 2
    assert "dense hydra model" in proc.stderr
