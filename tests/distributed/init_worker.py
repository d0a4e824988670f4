"""torchrun worker: FSDP-sharded meta init vs a plain single-process init (see test_init.py)."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

from hydra_titan.config import load_config
from hydra_titan.distributed import ParallelDims, parallelize_decoder
from hydra_titan.distributed.init import init_model_weights
from hydra_titan.models import get_model_spec


def main(model_name: str, mode: str) -> int:
    dist.init_process_group("gloo")
    cfg = load_config(["--model.name", model_name, "--parallelism.init_mode", mode,
                       "--training.mixed_precision_param", "float32"])
    spec = get_model_spec(model_name)
    args = spec.args("debug", vocab_size=256, dim=128, n_heads=2, head_dim=32)
    dims = ParallelDims.resolve(1, -1, dist.get_world_size())
    with torch.device("meta"):
        model = spec.model_cls(args)
    parallelize_decoder(model, parallel_dims=dims, mesh=dims.build_mesh("cpu"), cfg=cfg,
                        options=spec.parallelize_options)
    model.to_empty(device="cpu")
    torch.manual_seed(1234)  # a different global state: init must not depend on it
    init_model_weights(model, build_unsharded=lambda: spec.model_cls(args), device=torch.device("cpu"),
                       mode=mode, seed=cfg.job.seed)
    sharded = {k: v.full_tensor() for k, v in model.state_dict().items()}

    plain = spec.model_cls(args)  # an ordinary single-process model, seeded right before init
    torch.manual_seed(cfg.job.seed)
    plain.init_weights()
    same = all(torch.equal(v, sharded[k]) for k, v in plain.state_dict().items())
    if dist.get_rank() == 0:
        print(f"RESULT {'equal' if same else 'different'}", flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1], sys.argv[2])
    sys.stdout.flush()
    os._exit(code)
