"""The Waaagh decoder (seed 003, DESIGN §3.10): SSM backbone + four specialist heads + MoE per block.

    x = x + SSM(norm(x))
    x = x + W_o [local | sparse global | memory | prediction](norm(x))
    x = x + MoE(norm(x))

The seed's block did not run (a non-causal conv, no top-k in its "MoE", future keys visible to
the sparse head before masking); every part here is causal and each is the stack's shared piece
where one exists (the Mamba-2 mixer, the MoE FFN, RoPE, the decode cache). `args.ablate` removes
components from every block (see WaaaghBlock).
"""

from __future__ import annotations

import torch
from torch import nn

from ..common.block import Stats
from ..common.cache import CacheView, DecodeCache, child_view
from ..common.decoder import Decoder
from ..common.init import trunc_normal_
from ..common.moe import build_feed_forward, feed_forward_with_stats, moe_model_outputs
from ..common.norms import RMSNorm
from ..common.ssm import Mamba2Mixer
from .args import HEAD_NAMES, WaaaghModelArgs
from .heads import LocalHead, MemoryHead, PredictionHead, SparseGlobalHead


class WaaaghBlock(nn.Module):
    """One block; `args.ablate` removes components from it (the seed's component comparison):

    * a removed head ("local", "sparse", "memory", "prediction") is not built and gives zeros of its
      quarter of the width to W_o, whose shape is unchanged (with all four removed the heads
      sub-block goes: W_o would only multiply zeros);
    * "prediction" also removes the prediction loss (0 for this block);
    * "ssm" skips the SSM sub-block (norm and mixer are not built);
    * "moe" removes the routing, keeping the FFN: a dense SwiGLU as wide as one expert (at top-1
      and no shared experts, the same FFN work per token, less the router).
    """

    def __init__(self, args: WaaaghModelArgs, layer_id: int):
        super().__init__()
        self.head_width = args.head_width
        has_ssm = args.has("ssm")
        self.ssm_norm = RMSNorm(args.dim, args.norm_eps) if has_ssm else None
        self.ssm = Mamba2Mixer(args.dim, args.ssm_config, args.norm_eps) if has_ssm else None
        self.local = LocalHead(args) if args.has("local") else None
        self.sparse = SparseGlobalHead(args) if args.has("sparse") else None
        self.memory = MemoryHead(args) if args.has("memory") else None
        self.prediction = PredictionHead(args) if args.has("prediction") else None
        has_heads = any(args.has(name) for name in HEAD_NAMES)
        self.heads_norm = RMSNorm(args.dim, args.norm_eps) if has_heads else None
        self.wo = nn.Linear(args.dim, args.dim, bias=False) if has_heads else None
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        routed, hidden = args.ffn_layout(layer_id)
        self.feed_forward = build_feed_forward(args.dim, hidden, args if routed else None)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rope_cache: torch.Tensor,
                cache: CacheView | None = None) -> tuple[torch.Tensor, Stats]:
        h = x if self.ssm is None else x + self.ssm(self.ssm_norm(x), cache=child_view(cache, "ssm"))
        predicted = None
        if self.wo is not None:
            n = self.heads_norm(h)
            predicted = None if self.prediction is None else self.prediction(n)
            h = h + self.wo(torch.cat(self._specialists(n, positions, rope_cache, cache, predicted), dim=-1))
        out, stats = feed_forward_with_stats(self.feed_forward, self.ffn_norm(h))
        # decode scores no future position, so the prediction loss is a training (and eval) term only
        if predicted is None or cache is not None:
            aux = x.new_zeros((), dtype=torch.float32)
        else:
            aux = self.prediction.aux_loss(predicted, x)
        return h + out, {**stats, "predict_aux": aux}

    def _specialists(self, n: torch.Tensor, positions: torch.Tensor, rope_cache: torch.Tensor,
                     cache: CacheView | None, predicted: torch.Tensor | None) -> list[torch.Tensor]:
        """The four heads' outputs in W_o's input order; zeros [B, T, dim/4] for a removed one."""
        removed = n.new_zeros(*n.shape[:-1], self.head_width)
        return [
            removed if self.local is None else self.local(n, positions, rope_cache, child_view(cache, "local")),
            removed if self.sparse is None else self.sparse(n, positions, rope_cache, child_view(cache, "sparse")),
            removed if self.memory is None else self.memory(n),
            removed if predicted is None else predicted,
        ]

    def init_weights(self, init_std: float, out_std: float) -> None:
        for norm in (self.ssm_norm, self.heads_norm, self.ffn_norm):
            if norm is not None:
                norm.reset_parameters()
        if self.ssm is not None:
            self.ssm.init_weights(init_std, out_std)
        for head in (self.local, self.sparse, self.memory, self.prediction):
            if head is not None:
                head.init_weights(init_std, out_std)
        if self.wo is not None:
            trunc_normal_(self.wo.weight, out_std)
        self.feed_forward.init_weights(init_std, out_std)


class WaaaghModel(Decoder):
    def __init__(self, args: WaaaghModelArgs):
        layers = nn.ModuleDict({str(i): WaaaghBlock(args, i) for i in range(args.n_layers)})
        super().__init__(args, layers, residual_depth=2 * args.n_layers)  # two mixers per block

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                cache: DecodeCache | None = None, valid: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits, per_layer = self.run_layers(tokens, positions, cache, valid)
        predict_aux = torch.stack([s["predict_aux"] for s in per_layer]).mean()
        aux = self.args.predict_aux_weight * predict_aux if self.args.predict_aux_weight else predict_aux.new_zeros(())
        moe_aux, moe_outputs = moe_model_outputs(per_layer, self.args)
        if moe_aux is not None:
            aux = aux + moe_aux
        return {"logits": logits, "aux_loss": aux, "ponder_loss": predict_aux.new_zeros(()),
                "predict_aux_loss": predict_aux.detach(), **moe_outputs}
