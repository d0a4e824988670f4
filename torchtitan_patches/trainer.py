"""torchtitan's Trainer, taught what hydra_titan's models return.

torchtitan 0.3.0's step feeds the model output straight into its loss
(``loss_fn(pred, labels)``) and has no hook for auxiliary losses.
hydra_titan's models return a mapping: the logits plus router / MoE balance
terms (``aux_loss``), the MoR ponder cost and routing statistics. This
subclass changes only what it must:

* ``_forward_backward_body`` (the function torchtitan wraps in a CUDA graph when
  ``training.disable_cuda_graphs`` is false): torchtitan's loss on
  ``outputs["logits"]`` plus :class:`RouterLoss`'s token-weighted aux and
  ponder terms, then backward. Its loss parts and expert loads are accumulated
  in place into buffers allocated before the first step, so a captured graph
  keeps updating them on replay;
* ``train_step``: after torchtitan's step, MoE expert biases move by the
  step's global loads (hydra_titan's loss-free balancing), and on log steps
  the parts (ce, aux, ponder and their total, which is the loss torchtitan
  logs) go to torchtitan's metric loggers and to ``<dump_folder>/metrics.jsonl``
  with hydra_titan's key names;
* ``__init__``: on a host without an accelerator, torchtitan is pointed at the
  CPU first (``cpu.py``); on torch 2.13 the one torch call torchtitan 0.3.0
  misses there is provided (``compat.py``).

Everything else (data-parallel meshes, loss normalization by the global token
count, gradient clipping, optimizer and lr schedule, checkpoints, profiling)
is torchtitan's.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torchtitan.components.loss import ChunkedLossWrapper, CrossEntropyLoss
from torchtitan.distributed import utils as dist_utils
from torchtitan.trainer import Trainer

from hydra_titan.models.common.moe import moe_layers, update_expert_biases

from .checkpoint import HydraCheckpointManager
from .compat import provide_set_timeout
from .cpu import use_cpu_if_no_accelerator
from .dataloader import HydraDataLoader
from .model import HydraTitanModel
from .optimizer import HydraOptimizersContainer
from .router_loss import RouterLoss
from .tokenizer import HydraTokenizer

logger = logging.getLogger(__name__)

PARTS = ("total", "ce", "aux", "ponder")  # rows of the step's loss-part buffer ("total": the loss torchtitan logs)


class HydraTrainer(Trainer):
    @dataclass(kw_only=True, slots=True)
    class Config(Trainer.Config):
        tokenizer: HydraTokenizer.Config = field(default_factory=HydraTokenizer.Config)
        dataloader: HydraDataLoader.Config = field(default_factory=HydraDataLoader.Config)
        optimizer: HydraOptimizersContainer.Config = field(default_factory=HydraOptimizersContainer.Config)
        checkpoint: HydraCheckpointManager.Config = field(default_factory=HydraCheckpointManager.Config)
        loss: CrossEntropyLoss.Config = field(default_factory=CrossEntropyLoss.Config)
        router_loss: RouterLoss.Config = field(default_factory=RouterLoss.Config)
        """weights of the model's auxiliary losses (torchtitan has no such section)"""

        def __post_init__(self) -> None:
            Trainer.Config.__post_init__(self)  # slots dataclasses cannot use zero-argument super()
            if self.model_spec is not None and not isinstance(self.model_spec.model, HydraTitanModel.Config):
                raise ValueError(f"HydraTrainer trains hydra_titan models (HydraTitanModel.Config), got "
                                 f"{type(self.model_spec.model).__qualname__}")
            if isinstance(self.loss, ChunkedLossWrapper.Config):
                raise ValueError("ChunkedLossWrapper needs a model that can skip its LM head; hydra_titan models "
                                 "return logits: use CrossEntropyLoss.Config")

    def __init__(self, config: Config) -> None:
        use_cpu_if_no_accelerator()
        provide_set_timeout()
        self.router_loss = config.router_loss.build()
        super().__init__(config)
        model = self.model_parts[0]
        self.moe_layers = moe_layers(model)
        # step accumulators, written inside the (possibly graph-captured) forward/backward body
        self.step_parts = torch.zeros(len(PARTS), device=self.device)
        args = model.config.args
        self.step_moe_load = (torch.zeros(len(self.moe_layers), args.moe_num_experts, device=self.device)
                              if self.moe_layers else None)
        self.metrics_file = Path(config.dump_folder) / "metrics.jsonl"

    def _forward_backward_body(self, inputs: torch.Tensor, labels: torch.Tensor, global_valid_tokens: torch.Tensor,
                               extra_kwargs: dict[str, Any]) -> torch.Tensor:
        with self.train_context():
            outputs = self.model_parts[0](inputs, **extra_kwargs)
            ce, _ = self.loss_fn(outputs["logits"], labels, global_valid_tokens)
            router, parts = self.router_loss(outputs, labels, global_valid_tokens)
            loss = ce + router
            self.step_parts.add_(torch.stack([loss.detach().float(), ce.detach().float(), parts["aux"].detach(),
                                              parts["ponder"].detach()]))
            if self.step_moe_load is not None:
                self.step_moe_load.add_(outputs["moe_load"])
            del outputs
            loss.backward()
        return loss  # this rank's sum over its tokens / global tokens, as torchtitan's own body returns

    def train_step(self, data_iterator) -> None:
        self.step_parts.zero_()
        if self.step_moe_load is not None:
            self.step_moe_load.zero_()
        log = self.metrics_processor.should_log(self.step)
        super().train_step(data_iterator)
        loss_mesh = self.parallel_dims.get_optional_mesh("loss") if self.parallel_dims.dp_cp_enabled else None
        if self.step_moe_load is not None:  # after the optimizer step, as hydra_titan's trainer does
            update_expert_biases(self.moe_layers, dist_utils.dist_sum_tensor(self.step_moe_load, loss_mesh))
        if log:
            self._log_parts(dist_utils.dist_sum_tensor(self.step_parts, loss_mesh))

    def _log_parts(self, parts: torch.Tensor) -> None:
        values = dict(zip(PARTS, parts.tolist()))
        row = {f"loss/{k}": v for k, v in values.items()}
        self.metrics_processor.logger.log({f"loss_parts/{k}": v for k, v in values.items()}, self.step)
        logger.info("step %d  loss %.5f (ce %.5f aux %.4g ponder %.4g)", self.step, values["total"], values["ce"],
                    values["aux"], values["ponder"])
        if not dist.is_initialized() or dist.get_rank() == 0:
            self.metrics_file.parent.mkdir(parents=True, exist_ok=True)
            with open(self.metrics_file, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": self.step, **row}) + "\n")
