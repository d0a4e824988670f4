"""training.cuda_graph on the GPU: replayed micro-steps give bitwise the losses of uncaptured ones.

Each case trains 10 steps uncaptured and 10 steps captured (2 eager warm-up steps, then replays)
from the same initial weights on the same batches, in one process (graph_step_worker.py), with
compiled blocks, bf16 FSDP2 on one rank, and deterministic algorithms (atomics would make even two
uncaptured runs differ). Losses, gradient norms and the final weights must be equal, not close.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hydra_titan.distributed.cuda_graph import CaptureError, CapturedMicroStep

pytestmark = pytest.mark.gpu

REPO = Path(__file__).resolve().parents[2]
STEPS = 10
COMMON = ["--training.steps", str(STEPS), "--training.local_batch_size", "4", "--training.seq_len", "256",
          "--training.mixed_precision_param", "bfloat16", "--compile.enable", "true",
          "--activation_checkpoint.mode", "selective", "--validation.enable", "false",
          "--metrics.enable_tensorboard", "false", "--metrics.enable_db", "false"]

CASES = {
    "llama": ["--config", "train_configs/llama_debug.toml"],
    "hydra": ["--config", "train_configs/debug.toml"],  # MoD + MoR top-k routing
    "hydra_grad_accum": ["--config", "train_configs/debug.toml", "--training.gradient_accumulation_steps", "2"],
    "hydra_moe": ["--config", "train_configs/debug.toml", "--model.overrides.moe_num_experts", "4"],
    "hybrid_v1": ["--config", "train_configs/hybrid_debug.toml"],
}


@pytest.mark.parametrize("case", list(CASES))
def test_captured_steps_equal_uncaptured_bitwise(case, tmp_path):
    env = {**os.environ, "CUBLAS_WORKSPACE_CONFIG": ":4096:8", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(REPO / "tests/gpu/graph_step_worker.py"), str(STEPS), "--",
                           *CASES[case], *COMMON, "--job.dump_folder", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    accum = 2 if "grad_accum" in case else 1
    assert result["replays"] == STEPS * accum - 2  # every micro-batch after the two warm-up ones
    assert result["captured"] == result["eager"], result
    assert result["captured_grad_norms"] == result["eager_grad_norms"], result
    assert result["weights_max_abs_diff"] == 0.0, result
    assert result["eager"][-1] < result["eager"][0]  # it trained


def test_capture_refuses_a_host_sync_with_a_clear_error():
    def step(x):
        return {"total": x.sum() * (x.sum().item() + 1)}, {}  # .item() inside: not capturable

    captured = CapturedMicroStep(step, warmup_steps=1)
    x = torch.ones(4, device="cuda")
    captured(x)  # the eager warm-up runs it
    with pytest.raises(CaptureError, match="training.cuda_graph = false"):
        captured(x)


def test_replays_read_new_inputs_and_results_survive_the_next_replay():
    def step(x, scale):
        return {"total": (x * scale).sum()}, {"max": x.max()}

    captured = CapturedMicroStep(step, warmup_steps=1)
    scale = torch.tensor(2.0, device="cuda")
    outs = [captured(torch.full((8,), float(i), device="cuda"), scale) for i in range(5)]
    assert captured.replays == 4
    assert [o[0]["total"].item() for o in outs] == [0.0, 16.0, 32.0, 48.0, 64.0]
    assert [o[1]["max"].item() for o in outs] == [0.0, 1.0, 2.0, 3.0, 4.0]
    with pytest.raises(CaptureError, match="changed from"):
        captured(torch.ones(9, device="cuda"), scale)


def _train(dump: Path, *args: str) -> tuple[list[dict], str]:
    """train.py on the debug HYDRA (bf16, compile), validation every 4 steps, a checkpoint every 3."""
    cmd = [sys.executable, "train.py", "--config", "train_configs/debug.toml", *COMMON, "--validation.enable", "true", "--validation.freq", "4",
           "--validation.steps", "2", "--checkpoint.enable", "true", "--checkpoint.interval", "3",
           "--lr_scheduler.decay_type", "constant", "--lr_scheduler.warmup_steps", "2",  # lr independent of steps
           "--metrics.log_freq", "1", "--job.dump_folder", str(dump), *args]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return [json.loads(line) for line in (dump / "metrics.jsonl").read_text().splitlines()], proc.stdout


def test_the_train_loop_validates_checkpoints_and_resumes_under_cuda_graph(tmp_path):
    """Validation (eager, eval routing) between replays, a checkpoint, and a resume that warms up and
    captures again: the captured run follows the uncaptured one's losses, before and after the resume."""
    def series(rows, key):
        return {r["step"]: r[key] for r in rows if key in r}

    eager, _ = _train(tmp_path / "eager", "--training.steps", "10", "--training.cuda_graph", "false")
    captured, _ = _train(tmp_path / "captured", "--training.steps", "10", "--training.cuda_graph", "true")
    _train(tmp_path / "resumed", "--training.steps", "7", "--training.cuda_graph", "true")
    resumed, log = _train(tmp_path / "resumed", "--training.steps", "10", "--training.cuda_graph", "true")
    assert "resuming at step 7" in log
    want = series(eager, "loss/total")
    assert sorted(want) == list(range(1, 11))
    for rows in (captured, resumed):
        got = series(rows, "loss/total")
        assert sorted(got) == sorted(want)
        # not bitwise here: no deterministic mode, so atomics may differ in the last bits
        assert all(abs(got[s] - want[s]) <= 2e-3 * abs(want[s]) for s in want), (got, want)
        val_got, val_want = series(rows, "validation/loss"), series(eager, "validation/loss")
        assert sorted(val_want) == [4, 8, 10]  # (the resumed folder also holds its first run's step 7)
        assert all(abs(val_got[s] - val_want[s]) <= 2e-3 * val_want[s] for s in val_want), (val_got, val_want)
