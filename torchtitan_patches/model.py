"""One of hydra_titan's registered models, behind torchtitan 0.3.0's model protocol.

torchtitan builds a model from ``ModelSpec.model`` (a ``BaseModel.Config``):
``update_from_config`` with the trainer config, ``get_nparams_and_flops`` for
the metrics, ``build()`` on the meta device, ``verify_module_protocol()``,
then ``parallelize_fn``, ``to_empty`` and ``init_weights(buffer_device=...)``.
:class:`HydraTitanModel` answers all of these for any family of hydra_titan's
registry (hydra, llama, hybrid, waaagh) without copying it:

* the decoder is held as the child ``model``, so the state-dict keys
  torchtitan checkpoints (``model.tok_embeddings.weight``, ...) are exactly the
  ``model.*`` keys of a hydra_titan checkpoint: either loads the other's
  weights (see ``checkpoint.py``);
* the arguments are resolved as hydra_titan's trainer resolves them (flavor +
  overrides, vocabulary rounded up from the tokenizer, ``max_seq_len`` raised
  to the sequence length);
* ``init_weights`` is hydra_titan's layout-independent init (``full`` mode: an
  unsharded twin seeded with the job seed), so both trainers start from the
  same weights on any number of ranks;
* FLOPs and parameters come from the family's ModelSpec (executed FLOPs, with
  the routing capacities applied).

``forward`` returns the decoder's mapping (``logits``, ``aux_loss``,
``ponder_loss``, routing statistics); ``HydraTrainer`` takes the loss from it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torchtitan.protocols import BaseModel

from hydra_titan.components.checkpoint_files import model_args_to_dict
from hydra_titan.config.job_config import JobConfig, Model, Tokenizer, Training
from hydra_titan.distributed.init import init_model_weights
from hydra_titan.distributed.parallelize import check_decoder_contract
from hydra_titan.models import ModelSpec, get_model_spec
from hydra_titan.train import resolve_model_args

from .tokenizer import HydraTokenizer

logger = logging.getLogger(__name__)


class HydraTitanModel(BaseModel):
    @dataclass(kw_only=True, slots=True)
    class Config(BaseModel.Config):
        name: str = "hydra"
        """model family in hydra_titan's registry (hydra | llama | hybrid | waaagh)"""

        flavor: str = "debug"
        """size flavor of the family"""

        overrides: dict[str, Any] = field(default_factory=dict)
        """model-argument overrides (hydra_titan's [model.overrides])"""

        init_mode: str = "full"
        """hydra_titan's parallelism.init_mode: full (same weights in every layout) | sharded"""

        args: Any = None
        """the resolved model args; set by update_from_config"""

        tokenizer: str = ""
        """the tokenizer the args were sized for; set by update_from_config, recorded in checkpoints"""

        seed: int = 0
        """weight-init seed: torchtitan's debug.seed (0 when unset); set by update_from_config"""

        def __post_init__(self) -> None:
            get_model_spec(self.name)  # an unknown family fails here, naming the registered ones
            if self.init_mode not in ("full", "sharded"):
                raise ValueError(f"init_mode must be full | sharded, got {self.init_mode!r}")

        @property
        def spec(self) -> ModelSpec:
            return get_model_spec(self.name)

        def update_from_config(self, *, config: Any, **kwargs: Any) -> None:
            """Resolve the args from the trainer config, as hydra_titan's trainer does (vocabulary from the
            tokenizer, max_seq_len >= training.seq_len); bad overrides raise ConfigError naming them."""
            del kwargs
            if not isinstance(config.tokenizer, HydraTokenizer.Config):
                raise ValueError(f"{self.name} models need tokenizer = HydraTokenizer.Config (hydra_titan's "
                                 f"tokenizers), got {type(config.tokenizer).__qualname__}")
            tokenizer = HydraTokenizer(config.tokenizer).tokenizer
            job = JobConfig(model=Model(name=self.name, flavor=self.flavor, overrides=dict(self.overrides)),
                            training=Training(seq_len=config.training.seq_len),
                            tokenizer=Tokenizer(name=config.tokenizer.name))
            self.args = resolve_model_args(self.spec, job, tokenizer)
            self.tokenizer = config.tokenizer.name
            self.seed = config.debug.seed if config.debug.seed is not None else 0

        def get_nparams_and_flops(self, model: torch.nn.Module, seq_len: int) -> tuple[int, int]:
            """(total parameters, executed training FLOPs per token) from the family's ModelSpec."""
            report = self.spec.param_report(self.args, seq_len, model=model.model)
            flops = self.spec.flops_per_token(self.args, seq_len)
            logger.info("%s/%s: %.1fM params (%.1fM active per token), %.3f GFLOP/token executed "
                        "(%.3f dense-equivalent)", self.name, self.flavor, report.total / 1e6, report.active / 1e6,
                        flops.executed / 1e9, flops.dense / 1e9)
            return report.total, int(flops.executed)

    def __init__(self, config: Config) -> None:
        super().__init__()
        if config.args is None:
            raise ValueError("HydraTitanModel.Config.args is unset: call update_from_config(config=...) "
                             "before build() (torchtitan's trainer does)")
        self.config = config
        self.model = config.spec.model_cls(config.args)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return self.model(tokens, positions)

    def verify_module_protocol(self) -> None:
        """hydra_titan's decoders are plain nn.Modules; what the bridge relies on is the decoder contract."""
        check_decoder_contract(self.model)

    def init_weights(self, buffer_device: torch.device | None = None, **kwargs: Any) -> None:
        """hydra_titan's init (after torchtitan's ``to_empty``), seeded with ``config.seed``."""
        del kwargs
        device = buffer_device or next(self.model.parameters()).device
        init_model_weights(self.model, build_unsharded=lambda: self.config.spec.model_cls(self.config.args),
                           device=device, mode=self.config.init_mode, seed=self.config.seed)

    def checkpoint_meta(self) -> dict[str, Any]:
        """What hydra_titan's checkpoint metadata records about the model (generate.py rebuilds it from this)."""
        return {"model_name": self.config.name, "model_args": model_args_to_dict(self.config.args),
                "tokenizer": self.config.tokenizer}
