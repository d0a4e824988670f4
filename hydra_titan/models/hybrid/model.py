"""Hybrid SSM-attention decoders v1 / v2 / v3 (seed 001, DESIGN §3.9).

Every layer is pre-RMSNorm mixer + residual, then pre-RMSNorm SwiGLU (or MoE) + residual:
* "S": the Mamba-2 mixer (v3: plus the global SSM over earlier chunks' summaries);
* "A": the common grouped-query attention with RoPE (common/gqa.py, llama's attention);
* "R" (v2): the SSM on every token, then MoD-style routing (DESIGN §3.4 mechanics, the same
  router as HYDRA's MoD): a static top-k fraction gets causal attention among itself, added as
  sigmoid(r)·attn, so the router is on the task-gradient path; a BCE aux loss teaches it to
  predict top-k membership and evaluation routes by sigmoid(r) > 0.5 (causal).
The seed's LayerNorm / GELU / learned positions / tied head are replaced by the stack's
RMSNorm / SwiGLU / RoPE / untied head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..common.block import PreNormBlock, Stats
from ..common.cache import CacheView, DecodeCache, child_view
from ..common.decoder import Decoder
from ..common.moe import build_feed_forward, feed_forward_with_stats, moe_model_outputs
from ..common.norms import RMSNorm
from ..common.ssm import Mamba2Mixer, SSMConfig
from ..common.mod import MoDRouter
from ..common.gqa import GQAttention
from .args import HybridModelArgs


def chunk_summaries(x: torch.Tensor, chunk: int) -> torch.Tensor:
    """Mean of each `chunk`-token chunk: [B, T, D] -> [B, ceil(T / chunk), D] (a partial last chunk is
    zero-padded; only later chunks would read it, and there are none)."""
    pad = -x.shape[1] % chunk
    return F.pad(x, (0, 0, 0, pad)).unflatten(1, (-1, chunk)).mean(dim=2)


class HierarchicalMixer(nn.Module):
    """v3's SSM: a token-level Mamba-2 plus, per level, a global Mamba-2 over chunk summaries.

    The global output of chunk c is added to the tokens of chunk c+1 only: nothing reads its own
    chunk or a later one (the seed's chunk average leaked the future).
    """

    def __init__(self, dim: int, local: SSMConfig, global_cfg: SSMConfig, chunks: tuple[int, ...], norm_eps: float):
        super().__init__()
        self.local = Mamba2Mixer(dim, local, norm_eps)
        self.chunks = chunks
        self.levels = nn.ModuleList(Mamba2Mixer(dim, global_cfg, norm_eps) for _ in chunks)

    def global_context(self, x: torch.Tensor) -> torch.Tensor:
        """What each token reads from the earlier chunks, summed over the levels: [B, T, D]."""
        seq_len = x.shape[1]
        out = torch.zeros_like(x)
        for chunk, mixer in zip(self.chunks, self.levels):
            per_chunk = mixer(chunk_summaries(x, chunk))
            shifted = F.pad(per_chunk[:, :-1], (0, 0, 1, 0))  # chunk c reads the output at chunk c-1
            out = out + shifted.repeat_interleave(chunk, dim=1)[:, :seq_len]
        return out

    def cached_global_context(self, x: torch.Tensor, positions: torch.Tensor, cache: CacheView) -> torch.Tensor:
        """Decode: the same context, from the cached mixer inputs of every earlier token of each row.

        The chunk summaries are rebuilt from that history and the global mixers rerun over them (a
        sequence 1/chunk as long as the cache), so rows at different positions need no per-row
        chunk bookkeeping.
        """
        bsz, _, dim = x.shape
        max_len = cache.cache.max_len
        history = cache.get("history", lambda: x.new_zeros((bsz, max_len + 1, dim)))  # last row: padding's slot
        slot = torch.where(cache.valid, positions, max_len)
        history.scatter_(1, slot[..., None].expand(-1, -1, dim), x)
        out = torch.zeros_like(x)
        for chunk, mixer in zip(self.chunks, self.levels):
            # every slot, written or not: the causal mixers let no later chunk reach an earlier one,
            # and reading all of them keeps the shape static (no host read of the fill level)
            per_chunk = mixer(chunk_summaries(history[:, :max_len], chunk))
            shifted = F.pad(per_chunk[:, :-1], (0, 0, 1, 0))
            at = (positions // chunk).clamp(0, shifted.shape[1] - 1)
            out = out + shifted.gather(1, at[..., None].expand(-1, -1, dim))
        return out

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None,
                rope_cache: torch.Tensor | None = None, cache: CacheView | None = None) -> torch.Tensor:
        if cache is None:
            return self.local(x) + self.global_context(x)
        return self.local(x, cache=cache.child("local")) + self.cached_global_context(x, positions, cache)

    def init_weights(self, init_std: float, out_std: float) -> None:
        self.local.init_weights(init_std, out_std)
        for mixer in self.levels:
            mixer.init_weights(init_std, out_std)


class RoutedLayer(nn.Module):
    """v2: x += SSM(norm(x)); routed tokens += sigmoid(r)·attn(norm(routed)); x += FFN(norm(x))."""

    def __init__(self, args: HybridModelArgs, moe: bool):
        super().__init__()
        self.ssm_norm = RMSNorm(args.dim, args.norm_eps)
        self.ssm = Mamba2Mixer(args.dim, args.ssm_config, args.norm_eps)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = GQAttention(args)
        self.mod = MoDRouter(args.dim, args.attn_capacity, "topk", args.eval_routing, args.routing_kernel)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = build_feed_forward(args.dim, args.ffn_hidden_dim, args if moe else None)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rope_cache: torch.Tensor,
                cache: CacheView | None = None) -> tuple[torch.Tensor, Stats]:
        h = x + self.ssm(self.ssm_norm(x), cache=child_view(cache, "ssm"))

        def routed_attention(xs, ps, valid):  # valid: right padding in eval, which causal attention ignores
            view = child_view(cache, "attention", valid)  # K/V of routed tokens only
            return self.attention(self.attention_norm(xs), ps, rope_cache, cache=view), {}

        h, stats = self.mod(h, positions, routed_attention, None if cache is None else cache.valid)
        out, ffn_stats = feed_forward_with_stats(self.feed_forward, self.ffn_norm(h))
        return h + out, {**stats, **ffn_stats}

    def init_weights(self, init_std: float, out_std: float) -> None:
        for norm in (self.ssm_norm, self.attention_norm, self.ffn_norm):
            norm.reset_parameters()
        self.ssm.init_weights(init_std, out_std)
        self.attention.init_weights(init_std, out_std)
        self.mod.init_weights(init_std)
        self.feed_forward.init_weights(init_std, out_std)


def build_layer(args: HybridModelArgs, layer_id: int, kind: str) -> nn.Module:
    moe = args.is_moe_layer(layer_id, args.n_layers)
    if kind == "R":
        return RoutedLayer(args, moe)
    if kind == "A":
        mixer: nn.Module = GQAttention(args)
    elif args.variant == "v3":
        mixer = HierarchicalMixer(args.dim, args.ssm_config, args.global_ssm_config, args.global_chunk, args.norm_eps)
    else:
        mixer = Mamba2Mixer(args.dim, args.ssm_config, args.norm_eps)
    return PreNormBlock(mixer, dim=args.dim, ffn_hidden_dim=args.ffn_hidden_dim, norm_eps=args.norm_eps,
                        moe=args if moe else None)


class HybridModel(Decoder):
    def __init__(self, args: HybridModelArgs):
        kinds = args.layer_kinds()
        layers = nn.ModuleDict({str(i): build_layer(args, i, kind) for i, kind in enumerate(kinds)})
        super().__init__(args, layers, residual_depth=args.n_layers)
        self.layer_kinds = kinds
        self.mod_layer_ids = [i for i, kind in enumerate(kinds) if kind == "R"]

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                cache: DecodeCache | None = None, valid: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits, per_layer = self.run_layers(tokens, positions, cache, valid)
        zero = logits.new_zeros((), dtype=torch.float32)
        out = {"logits": logits, "ponder_loss": zero}
        aux = zero
        routed = [s for s in per_layer if "mod_aux" in s]
        if routed:
            router_aux = torch.stack([s["mod_aux"] for s in routed]).mean()
            if self.args.router_aux_weight:
                aux = aux + self.args.router_aux_weight * router_aux
            out["mod_aux_loss"] = router_aux.detach()
            out["mod_selected_frac"] = torch.stack([s["mod_frac"] for s in routed]).detach()
        moe_aux, moe_outputs = moe_model_outputs(per_layer, self.args)
        if moe_aux is not None:
            aux = aux + moe_aux
        return {**out, "aux_loss": aux, **moe_outputs}
