"""The Waaagh decoder (seed 003, DESIGN §3.10): SSM backbone + four specialist heads + MoE per block.

    x = x + SSM(norm(x))
    x = x + W_o [local | sparse global | memory | prediction](norm(x))
    x = x + MoE(norm(x))

The seed's block did not run (a non-causal conv, no top-k in its "MoE", future keys visible to
the sparse head before masking); every part here is causal and each is the stack's shared piece
where one exists (the Mamba-2 mixer, the MoE FFN, RoPE, the decode cache).
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
from .args import WaaaghModelArgs
from .heads import LocalHead, MemoryHead, PredictionHead, SparseGlobalHead


class WaaaghBlock(nn.Module):
    def __init__(self, args: WaaaghModelArgs, layer_id: int):
        super().__init__()
        self.ssm_norm = RMSNorm(args.dim, args.norm_eps)
        self.ssm = Mamba2Mixer(args.dim, args.ssm_config, args.norm_eps)
        self.heads_norm = RMSNorm(args.dim, args.norm_eps)
        self.local = LocalHead(args)
        self.sparse = SparseGlobalHead(args)
        self.memory = MemoryHead(args)
        self.prediction = PredictionHead(args)
        self.wo = nn.Linear(args.dim, args.dim, bias=False)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        moe = args.is_moe_layer(layer_id, args.n_layers)
        self.feed_forward = build_feed_forward(args.dim, args.ffn_hidden_dim, args if moe else None)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rope_cache: torch.Tensor,
                cache: CacheView | None = None) -> tuple[torch.Tensor, Stats]:
        h = x + self.ssm(self.ssm_norm(x), cache=child_view(cache, "ssm"))
        n = self.heads_norm(h)
        predicted = self.prediction(n)
        heads = [self.local(n, positions, rope_cache, child_view(cache, "local")),
                 self.sparse(n, positions, rope_cache, child_view(cache, "sparse")),
                 self.memory(n), predicted]
        h = h + self.wo(torch.cat(heads, dim=-1))
        out, stats = feed_forward_with_stats(self.feed_forward, self.ffn_norm(h))
        # decode scores no future position, so the prediction loss is a training (and eval) term only
        aux = predicted.new_zeros((), dtype=torch.float32) if cache is not None else self.prediction.aux_loss(predicted, x)
        return h + out, {**stats, "predict_aux": aux}

    def init_weights(self, init_std: float, out_std: float) -> None:
        for norm in (self.ssm_norm, self.heads_norm, self.ffn_norm):
            norm.reset_parameters()
        self.ssm.init_weights(init_std, out_std)
        for head in (self.local, self.sparse, self.memory, self.prediction):
            head.init_weights(init_std, out_std)
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
