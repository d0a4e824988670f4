"""Dense Llama-style decoder: the A/B baseline, sharing HYDRA's common layers.

Keeps the same decoder contract (tok_embeddings, layers ModuleDict, norm,
output, init_weights) and the same output mapping as HYDRA; its router terms
are zero (but the MoE Switch loss, when asked for), so the loss and metrics
code needs no special case.
"""

from __future__ import annotations

import torch
from torch import nn

from ..common.block import PreNormBlock
from ..common.cache import DecodeCache
from ..common.decoder import Decoder
from ..common.gqa import GQAttention
from ..common.moe import moe_model_outputs
from .args import LlamaModelArgs


class TransformerBlock(PreNormBlock):
    """A Llama block: grouped-query attention in the shared pre-norm block (with a MoE FFN on MoE layers)."""

    def __init__(self, args: LlamaModelArgs, layer_id: int = 0):
        super().__init__(GQAttention(args), dim=args.dim, ffn_hidden_dim=args.ffn_hidden_dim,
                         norm_eps=args.norm_eps, moe=args if args.is_moe_layer(layer_id, args.n_layers) else None)


class LlamaModel(Decoder):
    def __init__(self, args: LlamaModelArgs):
        layers = nn.ModuleDict({str(i): TransformerBlock(args, i) for i in range(args.n_layers)})
        super().__init__(args, layers, residual_depth=args.n_layers)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                cache: DecodeCache | None = None, valid: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits, per_layer = self.run_layers(tokens, positions, cache, valid)
        zero = logits.new_zeros((), dtype=torch.float32)
        moe_aux, moe_outputs = moe_model_outputs(per_layer, self.args)  # nothing for a dense model
        return {"logits": logits, "aux_loss": zero if moe_aux is None else moe_aux, "ponder_loss": zero,
                **moe_outputs}
