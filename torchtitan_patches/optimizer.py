"""torchtitan's optimizer container with hydra_titan's weight-decay exemptions.

torchtitan assigns parameters to groups by a regex on their names, and every
parameter of a group gets its ``weight_decay``. hydra_titan never decays norm
gains, biases, embeddings, routers, depth embeddings or temperatures (a decayed
router's logits drift towards the 0.5 threshold; see
``hydra_titan/components/optimizer.py``), a rule on names *and* shapes that a
regex cannot state. :class:`HydraOptimizersContainer` keeps torchtitan's
groups and config, and splits each group into the parameters hydra_titan
decays and the rest, which get ``weight_decay = 0``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn
from torchtitan.components.optimizer import OptimizersContainer, ParamGroupConfig

from hydra_titan.components.optimizer import is_no_decay


class HydraOptimizersContainer(OptimizersContainer):
    @dataclass(kw_only=True, slots=True)
    class Config(OptimizersContainer.Config):
        pass

    @staticmethod
    def _build_param_groups(model: nn.Module, param_group_configs: list[ParamGroupConfig],
                            impl_kwargs: dict[str, Any]) -> tuple[dict[str, list[dict[str, Any]]],
                                                                  dict[str, list[str]]]:
        groups, patterns = OptimizersContainer._build_param_groups(model, param_group_configs, impl_kwargs)
        exempt = {id(p) for name, p in model.named_parameters() if is_no_decay(name, p)}
        for opt_name in list(groups):
            split_groups, split_patterns = [], []
            for group, pattern in zip(groups[opt_name], patterns[opt_name]):
                for keep_decay in (True, False):
                    picked = [(p, n) for p, n in zip(group["params"], group["param_names"])
                              if (id(p) not in exempt) == keep_decay]
                    if not picked:
                        continue
                    params, names = map(list, zip(*picked))
                    extra = {} if keep_decay else {"weight_decay": 0.0}
                    split_groups.append({**group, "params": params, "param_names": names, **extra})
                    split_patterns.append(pattern if keep_decay else f"{pattern} (no decay)")
            groups[opt_name], patterns[opt_name] = split_groups, split_patterns
        return groups, patterns
