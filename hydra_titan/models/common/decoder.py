"""The decoder contract as a base class: embedding -> layers -> norm -> LM head.

The shared parallelize function relies on exactly these names
(`tok_embeddings`, `layers` as an nn.ModuleDict of blocks, `norm`, `output`,
`init_weights`), so every model family builds them here and only supplies its
blocks and its forward.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from .cache import CacheView, DecodeCache
from .init import trunc_normal_
from .moe import MoE
from .norms import RMSNorm
from .rope import rope_cache
from .validation import check_token_ids

INIT_STD = 0.02


class Decoder(nn.Module):
    def __init__(self, args, layers: nn.ModuleDict, residual_depth: int):
        super().__init__()
        self.args = args
        # residual-branch outputs shrink with the number of updates the stream receives
        self.residual_depth = residual_depth
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = layers
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        # layers that carry experts, in the row order of the `moe_load` output
        self.moe_layer_ids = [int(i) for i, layer in layers.items() if any(isinstance(m, MoE) for m in layer.modules())]
        self.register_buffer("rope_cache", rope_cache(args.head_dim, args.max_seq_len, args.rope_theta),
                             persistent=False)

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the non-persistent buffers (the RoPE table), which no checkpoint holds."""
        device = device if device is not None else self.rope_cache.device
        self.rope_cache = rope_cache(self.args.head_dim, self.args.max_seq_len, self.args.rope_theta, device=device)

    @torch.no_grad()
    def init_weights(self, buffer_device: torch.device | str | None = None) -> None:
        """Initialise every parameter and buffer (models are built on the meta device)."""
        self.init_buffers(buffer_device)
        nn.init.normal_(self.tok_embeddings.weight)
        out_std = INIT_STD / math.sqrt(2 * self.residual_depth)
        for layer in self.layers.values():
            layer.init_weights(INIT_STD, out_std)
        self.norm.reset_parameters()
        final_std = self.args.dim ** -0.5
        trunc_normal_(self.output.weight, final_std)

    def embed(self, tokens: torch.Tensor, positions: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Checked token embeddings and the position ids (0..S-1 unless given)."""
        check_token_ids(tokens, self.args.vocab_size, self.args.max_seq_len)
        bsz, seq_len = tokens.shape
        if positions is None:
            positions = torch.arange(seq_len, device=tokens.device).expand(bsz, seq_len)
        return self.tok_embeddings(tokens), positions

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.output(self.norm(h))

    def init_cache(self, batch: int, max_len: int, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> DecodeCache:
        """An empty decode cache (DESIGN §3.11) for `batch` rows of up to `max_len` tokens each.

        Its modules fill their own state on first use; K/V are kept in `dtype` (default: the weights'),
        SSM states in fp32."""
        weight = self.tok_embeddings.weight
        return DecodeCache(batch, max_len, device if device is not None else weight.device,
                           dtype if dtype is not None else weight.dtype)

    def run_layers(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                   cache: DecodeCache | None = None, valid: torch.Tensor | None = None,
                   blocks: Sequence[Callable] | None = None) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
        """Embedding -> every block -> norm + LM head: (logits, each block's stats), for every family's forward.

        With a `cache` (eval mode only) the tokens are appended to it and the logits are those of the
        new tokens; `valid` [B, T] marks the real ones (a batch of prompts of different lengths, right
        padded), default all.

        `blocks` (with a cache only): one callable per layer, run in place of `self.layers` and called
        as they are. A compiled decode step passes the compiled blocks here
        (components/generation.py::CompiledDecodeStep): the cache's host bookkeeping (`begin` checks
        the Python-int fill level, `advance` bumps it) stays in this eager frame, so no compiled code
        guards on a value that changes at every token.
        """
        if blocks is not None and (cache is None or len(blocks) != len(self.layers)):
            raise ValueError(f"blocks replace the {len(self.layers)} layers of a decode step with a cache, "
                             f"got {len(blocks)} blocks{'' if cache is not None else ' and no cache'}")
        if cache is None:
            if valid is not None:
                raise ValueError("valid is a decode-cache argument; a forward without a cache attends to every token")
            h, positions = self.embed(tokens, positions)
            views: list[CacheView | None] = [None] * len(self.layers)
        else:
            if self.training:
                raise ValueError("decoding with a cache needs model.eval(): training routes by top-k over the "
                                 "whole sequence, which a token-by-token decode cannot reproduce")
            check_token_ids(tokens, self.args.vocab_size, self.args.max_seq_len)
            positions, root = cache.begin(tokens, positions, valid, self.args.max_seq_len)
            h = self.tok_embeddings(tokens)
            views = [root.child(name) for name in self.layers]
        per_layer = []
        for layer, view in zip(self.layers.values() if blocks is None else blocks, views):
            # without a cache the blocks are called exactly as in training (what compile and AC wrap)
            h, stats = layer(h, positions, self.rope_cache, **({} if view is None else {"cache": view}))
            per_layer.append(stats)
        if cache is not None:
            cache.advance(root.valid)
        return self.head(h), per_layer
