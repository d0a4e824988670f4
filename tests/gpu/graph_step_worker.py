"""Train one config for N steps uncaptured and N steps with training.cuda_graph; print both runs as JSON.

Run by test_cuda_graph_step.py in its own process, so CUBLAS_WORKSPACE_CONFIG is read before cuBLAS
starts and the deterministic-algorithms switch covers the whole run:
    python tests/gpu/graph_step_worker.py STEPS -- --config train_configs/llama_debug.toml ...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from hydra_titan.config import load_config  # noqa: E402
from hydra_titan.train import Trainer  # noqa: E402


def run(argv: list[str], steps: int, cuda_graph: bool) -> dict:
    torch._dynamo.reset()
    cfg = load_config([*argv, "--training.cuda_graph", str(cuda_graph).lower()])
    trainer = Trainer(cfg)
    data = iter(trainer.train_loader)
    losses, grad_norms = [], []
    for step in range(1, steps + 1):
        trainer.state.step = step
        batches = [next(data) for _ in range(cfg.training.gradient_accumulation_steps)]
        result = trainer.train_step(batches)
        losses.append(result["parts"]["total"].item())
        grad_norms.append(result["grad_norm"].item())
    weights = torch.cat([p.detach().full_tensor().flatten().float() for p in trainer.model.parameters()])
    out = {"losses": losses, "grad_norms": grad_norms, "weights": weights.cpu(),
           "replays": trainer.captured_step.replays if trainer.captured_step is not None else 0}
    trainer.metrics.close()
    return out


def main() -> None:
    steps = int(sys.argv[1])
    argv = [a for a in sys.argv[2:] if a != "--"]
    torch.use_deterministic_algorithms(True, warn_only=True)  # atomics would make two eager runs differ
    eager, captured = run(argv, steps, False), run(argv, steps, True)
    print(json.dumps({"eager": eager["losses"], "captured": captured["losses"],
                      "eager_grad_norms": eager["grad_norms"], "captured_grad_norms": captured["grad_norms"],
                      "replays": captured["replays"],
                      "weights_max_abs_diff": (eager["weights"] - captured["weights"]).abs().max().item()}))


if __name__ == "__main__":
    main()
