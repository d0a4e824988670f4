"""Shared helpers for tests that run the real trainer in subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# a tiny HYDRA (or llama, via --model.name) that trains a step in well under a second on 2 cores
TINY_MODEL = ["--model.overrides.dim", "128", "--model.overrides.n_heads", "2", "--model.overrides.head_dim", "32"]
TINY_RUN = ["--config", "train_configs/debug.toml", "--training.seq_len", "64", "--metrics.log_freq", "1",
            "--metrics.enable_tensorboard", "false", "--lr_scheduler.warmup_steps", "2"]


def run_trainer(args: list[str], dump: Path, *, nproc: int = 1, timeout: int = 300,
                env: dict | None = None) -> subprocess.CompletedProcess:
    """Run train.py (under torchrun when nproc > 1) and return the completed process."""
    launcher = [sys.executable, "train.py"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--rdzv_backend", "c10d",
        "--rdzv_endpoint", "localhost:0", "train.py"]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(launcher + args + ["--job.dump_folder", str(dump)], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def losses(dump: Path, key: str = "loss/ce") -> list[float]:
    rows = [json.loads(line) for line in (dump / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if key in r]
