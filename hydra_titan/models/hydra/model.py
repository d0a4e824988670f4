"""The HYDRA language model: embedding -> HydraLayers -> norm -> LM head.

Each HydraLayer is one MoR block (shared weights applied up to `recursions`
times), optionally wrapped by a MoD router, and is the unit that activation
checkpointing, torch.compile and FSDP act on (DESIGN §5): the recursion loop
lives inside it, so its weights are gathered once per forward.

`forward` returns a mapping (DESIGN §3): `logits`, `aux_loss` (router losses
already weighted by the model's coefficients), `ponder_loss`, and routing
statistics as tensors (`moe_load` [MoE blocks, E] when blocks carry experts),
so nothing in the hot path syncs with the host.
"""

from __future__ import annotations

import torch
from torch import nn

from ..common.cache import CacheView, DecodeCache, child_view
from ..common.decoder import Decoder
from ..common.moe import moe_model_outputs
from .args import HydraModelArgs
from ..common.mod import MoDRouter
from .mor import MoRBlock


class HydraLayer(nn.Module):
    def __init__(self, layer_id: int, args: HydraModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.mor = MoRBlock(args, moe=args.is_block_moe(layer_id))
        self.mod = (MoDRouter(args.dim, args.mod_capacity, args.mod_mode, args.eval_routing,
                              args.routing_kernel)
                    if args.is_mod_layer(layer_id) else None)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rope: torch.Tensor,
                cache: CacheView | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.mod is None:
            delta, stats = self.mor(x, positions, rope, cache=cache)
            stats["mod_frac"] = x.new_ones((), dtype=torch.float32)  # no "mod_aux": there is no MoD router
            return x + delta, stats

        def inner(xs, ps, valid):  # a token the router skips leaves no entry in the block's cache
            return self.mor(xs, ps, rope, valid, cache=child_view(cache, "mor", valid))
        return self.mod(x, positions, inner, None if cache is None else cache.valid)

    def init_weights(self, init_std: float, out_std: float) -> None:
        self.mor.init_weights(init_std, out_std)
        if self.mod is not None:
            self.mod.init_weights(init_std)


class HydraModel(Decoder):
    def __init__(self, args: HydraModelArgs):
        layers = nn.ModuleDict({str(i): HydraLayer(i, args) for i in range(args.n_mor_blocks)})
        super().__init__(args, layers, residual_depth=args.effective_depth)
        self.mod_layer_ids = [i for i in range(args.n_mor_blocks) if args.is_mod_layer(i)]

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                cache: DecodeCache | None = None, valid: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits, per_layer = self.run_layers(tokens, positions, cache, valid)
        return {"logits": logits, **self._combine_stats(per_layer)}

    def _combine_stats(self, per_layer: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Average router losses over layers, weight them, and stack per-layer metrics."""
        def stack(key: str) -> torch.Tensor:
            return torch.stack([s[key] for s in per_layer])

        mor_aux, mor_z = stack("mor_aux").mean(), stack("mor_z").mean()
        mod_terms = [s["mod_aux"] for s in per_layer if "mod_aux" in s]  # MoD layers only
        mod_aux = torch.stack(mod_terms).mean() if mod_terms else mor_aux.new_zeros(())
        weighted = ((self.args.mod_aux_weight_value, mod_aux), (self.args.mor_aux_weight, mor_aux),
                    (self.args.mor_z_loss_weight, mor_z))
        # zero-weight terms are left out, not multiplied by 0: no backward kernels for them
        aux_loss = sum((w * term for w, term in weighted if w != 0), mor_aux.new_zeros(()))
        moe_aux, moe_outputs = moe_model_outputs(per_layer, self.args)  # MoE blocks only
        if moe_aux is not None:
            aux_loss = aux_loss + moe_aux
        return {
            "aux_loss": aux_loss,
            "ponder_loss": stack("ponder").mean(),
            "mod_aux_loss": mod_aux.detach(),
            "mor_aux_loss": mor_aux.detach(),
            "mod_selected_frac": stack("mod_frac").detach(),
            "mor_depth_hist": stack("mor_depth_hist").detach(),
            **moe_outputs,
        }
