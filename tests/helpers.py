"""Shared helpers: the real trainer in subprocesses, and the models the decode tests cover."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def load_script(name: str):
    """scripts/<name>.py as a module (registered in sys.modules, which dataclasses need)."""
    spec = importlib.util.spec_from_file_location(f"_script_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# a tiny HYDRA (or llama, via --model.name) that trains a step in well under a second on 2 cores
TINY_MODEL = ["--model.overrides.dim", "128", "--model.overrides.n_heads", "2", "--model.overrides.head_dim", "32"]
TINY_RUN = ["--config", "train_configs/debug.toml", "--training.seq_len", "64", "--metrics.log_freq", "1",
            "--metrics.enable_tensorboard", "false", "--lr_scheduler.warmup_steps", "2"]


def run_trainer(args: list[str], dump: Path, *, nproc: int = 1, timeout: int = 300,
                env: dict | None = None, max_restarts: int | None = None) -> subprocess.CompletedProcess:
    """Run train.py (under torchrun when nproc > 1 or max_restarts is given) and return the completed
    process."""
    torchrun = nproc > 1 or max_restarts is not None
    launcher = [sys.executable, "train.py"] if not torchrun else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--rdzv_backend", "c10d",
        "--rdzv_endpoint", "localhost:0", f"--max-restarts={max_restarts or 0}", "train.py"]
    # a fresh TCPStore per restart, as run_train.sh sets it (a shared one can hand stale addresses to
    # the restarted ranks: pytorch/pytorch#135712)
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", **(env or {})}
    return subprocess.run(launcher + args + ["--job.dump_folder", str(dump)], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def losses(dump: Path, key: str = "loss/ce") -> list[float]:
    rows = [json.loads(line) for line in (dump / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if key in r]


def losses_by_step(dump: Path, key: str = "loss/ce") -> dict[int, float]:
    """{step: loss} from metrics.jsonl; a step logged again after a restart keeps its last value."""
    rows = [json.loads(line) for line in (dump / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if key in r}


DECODE_VOCAB = 512
# family, flavor overrides: every routing path in eval (MoD + nested MoR thresholds, v2's routed
# attention), CCGQA's convs and value shift, SSM states, v3's chunk summaries, MoE FFNs
DECODE_CASES = {
    "llama": ("llama", {}),
    "llama_moe": ("llama", {"moe_num_experts": 4, "moe_top_k": 2, "moe_every": 2}),
    "hydra": ("hydra", {"recursions": 3, "conv_kernel_seq": 3, "dim": 384, "head_dim": 32, "n_heads": 6,
                        "n_kv_heads": 3}),
    "hydra_moe": ("hydra", {"moe_num_experts": 4, "mod_every": 2}),
    "hydra_soft": ("hydra", {"mod_mode": "soft", "mor_mode": "gaussian"}),
    "hybrid_v1": ("hybrid", {"variant": "v1", "ssm_chunk_size": 16}),
    "hybrid_v2": ("hybrid", {"variant": "v2", "ssm_chunk_size": 16}),
    "hybrid_v3": ("hybrid", {"variant": "v3", "ssm_chunk_size": 16, "global_chunk": (8, 16)}),
    "hybrid_v1_moe": ("hybrid", {"variant": "v1", "ssm_chunk_size": 16, "moe_num_experts": 4}),
    "waaagh": ("waaagh", {"ssm_chunk_size": 16, "window": 8, "sparse_k": 4, "sparse_query_chunk": 16}),
}


def build_decode_case(case: str, device: str = "cpu") -> torch.nn.Module:
    """The debug flavor of DECODE_CASES[case], seeded and initialised on the CPU, on `device`, in eval mode."""
    from hydra_titan.models import get_model_spec

    torch.manual_seed(0)
    name, overrides = DECODE_CASES[case]
    model = get_model_spec(name).build("debug", vocab_size=DECODE_VOCAB, max_seq_len=256, **overrides)
    model.init_weights()
    model.to(device)
    model.init_buffers(device)
    return model.eval()
