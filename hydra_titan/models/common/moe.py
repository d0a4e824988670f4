"""Mixture-of-Experts feed-forward (DESIGN §3.6): one component for every family.

Token choice: each token picks the top-k of E SwiGLU experts by an fp32 router
score (sigmoid, or softmax when asked). The gate that scales a chosen expert's
output is that expert's *unbiased* score (renormalised over the k when k > 1),
so the router learns from the task loss even at k = 1 (the original HYDRA's
top-1 gate was a softmax over one logit: the constant 1).

Balancing, by ``moe_balance``:
* ``"bias"`` (default; auxiliary-loss-free, after DeepSeek-V3 and torchtitan):
  a per-expert bias added to the router *logits* for the choice only; after
  each optimizer step the trainer moves it by
  ``rate * (mean_load - load) / mean_load`` from the step's expert loads
  (all-reduced over data-parallel ranks), then centres it (a shift common to
  all experts changes no choice). Two departures from DeepSeek's
  ``rate * sign(mean_load - load)`` on the scores, both measured on the debug
  HYDRA (docs/performance.md, "MoE balancing"): sigmoid scores saturate (a
  block's gates went to sigmoid(-7)), so a fixed step in score space was
  coarser than the scores' spread over tokens and the choice flipped between
  experts wholesale; and a proportional step moves fast while the load is
  collapsed and finely once it is nearly even, where a sign step must pick
  one of the two;
* ``"aux"``: the Switch loss ``E * sum_i f_i * P_i`` goes into ``aux_loss``;
* ``"none"``: neither.

Dispatch is dropless and static-shaped: the T*k (token, expert) slots are
sorted by expert (stable), gathered into one buffer, run through the experts
with ``torch._grouped_mm`` (group ends = cumulative counts, computed on the
device: no host sync) and combined back in a fixed order, weighted by the fp32
gates. Every gather has a gather as its backward (the slot permutation is
inverted), so the step is deterministic. The ``loop`` backend runs one expert
at a time; it reads the counts on the host and is the reference and fallback.

Where torch's grouped GEMM runs: on CUDA only bf16 has a kernel without a host
sync (SM90 CUTLASS), and the compiler's fake kernel accepts only bf16, so on
CUDA and under torch.compile the experts run in bf16 (inputs cast, output cast
back); eager CPU runs them in the input dtype (fp32 too).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .ffn import SwiGLU
from .init import trunc_normal_

MOE_BALANCE = ("bias", "aux", "none")
MOE_SCORE_FUNCS = ("sigmoid", "softmax")
MOE_BACKENDS = ("auto", "grouped_mm", "loop")
# torch._grouped_mm needs 16-byte strides: in bf16, K and N multiples of 8 elements
GROUPED_MM_ALIGN = 8


@dataclass
class MoEArgs:
    """The MoE fields of every family's model args (a base class of their dataclasses).

    0 experts = the dense SwiGLU. Placement: layer i carries experts when
    (i + 1) % moe_every == 0 (torchtitan's interleave rule: 1 = every layer,
    2 = every other layer ending on the last); ``moe_skip_ends`` also keeps the
    first and last layer dense, the original HYDRA's placement.
    """

    moe_num_experts: int = 0
    moe_top_k: int = 1
    moe_shared_experts: int = 0         # dense experts every token passes through, beside the routed k
    moe_hidden_dim: int = 0             # each expert's SwiGLU width; 0 = the dense FFN's (same active params at k=1)
    moe_balance: str = "bias"
    moe_aux_weight: float = 0.01        # Switch loss weight (balance "aux")
    moe_bias_update_rate: float = 0.1   # bias step (logits) per unit of relative load error (balance "bias")
    moe_score_func: str = "sigmoid"
    moe_every: int = 1
    moe_skip_ends: bool = False
    moe_backend: str = "auto"           # auto = grouped_mm where torch has it, else loop

    def is_moe_layer(self, layer_id: int, n_layers: int) -> bool:
        if self.moe_num_experts == 0:
            return False
        if self.moe_skip_ends and layer_id in (0, n_layers - 1):
            return False
        return (layer_id + 1) % self.moe_every == 0

    def moe_expert_hidden(self, dense_hidden: int) -> int:
        return self.moe_hidden_dim or dense_hidden

    def moe_backend_name(self) -> str:
        if self.moe_backend != "auto":
            return self.moe_backend
        return "grouped_mm" if hasattr(torch, "_grouped_mm") else "loop"

    def validate_moe(self, dim: int, dense_hidden: int, n_layers: int) -> None:
        """Raise ValueError naming the argument; nothing to check for a dense model but the names."""
        for name, allowed in (("moe_balance", MOE_BALANCE), ("moe_score_func", MOE_SCORE_FUNCS),
                              ("moe_backend", MOE_BACKENDS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("moe_num_experts", "moe_shared_experts", "moe_hidden_dim", "moe_aux_weight",
                     "moe_bias_update_rate"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.moe_num_experts == 0:
            return
        if not 1 <= self.moe_top_k <= self.moe_num_experts:
            raise ValueError(f"moe_top_k must be in [1, moe_num_experts = {self.moe_num_experts}], "
                             f"got {self.moe_top_k}")
        if self.moe_every < 1:
            raise ValueError(f"moe_every must be >= 1, got {self.moe_every}")
        if not any(self.is_moe_layer(i, n_layers) for i in range(n_layers)):
            raise ValueError(f"moe_every = {self.moe_every} (moe_skip_ends = {self.moe_skip_ends}) places no "
                             f"experts on any of the {n_layers} layers")
        hidden = self.moe_expert_hidden(dense_hidden)
        if self.moe_backend_name() == "grouped_mm" and (dim % GROUPED_MM_ALIGN or hidden % GROUPED_MM_ALIGN):
            raise ValueError(
                f"torch._grouped_mm needs the model dim ({dim}) and the expert width (moe_hidden_dim = {hidden}) "
                f"to be multiples of {GROUPED_MM_ALIGN} (16-byte strides in bf16); change them or set "
                "moe_backend = 'loop'")


# ----------------------------------------------------------------------------- dispatch


class _PermuteRows(torch.autograd.Function):
    """x[perm] for a permutation `perm` of the rows, whose backward is the gather by the inverse.

    Autograd's own backward of an index is a scatter-add (atomics on CUDA, and a
    sort-based kernel under deterministic mode); a permutation's inverse is a gather.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(inverse)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def permute_rows(x: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    return _PermuteRows.apply(x, perm, inverse)


ExpertsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _experts_grouped_mm(x: torch.Tensor, counts: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                        w3: torch.Tensor) -> torch.Tensor:
    """The three SwiGLU GEMMs of every expert at once; rows of x grouped by expert, `counts` per group."""
    dtype = x.dtype
    if dtype != torch.bfloat16 and (x.is_cuda or torch.compiler.is_compiling()):
        x, w1, w2, w3 = (t.to(torch.bfloat16) for t in (x, w1, w2, w3))
    offs = counts.cumsum(0).to(torch.int32)  # group ends, on the device
    h = F.silu(torch._grouped_mm(x, w1, offs=offs)) * torch._grouped_mm(x, w3, offs=offs)
    return torch._grouped_mm(h, w2, offs=offs).to(dtype)


def _experts_loop(x: torch.Tensor, counts: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                  w3: torch.Tensor) -> torch.Tensor:
    """One expert at a time (the reference): reads the counts on the host, so it syncs and does not compile."""
    outs = [(F.silu(rows @ w1[e]) * (rows @ w3[e])) @ w2[e]
            for e, rows in enumerate(torch.split(x, counts.tolist()))]
    return torch.cat(outs)


EXPERT_BACKENDS: dict[str, ExpertsFn] = {"grouped_mm": _experts_grouped_mm, "loop": _experts_loop}


class GroupedExperts(nn.Module):
    """E SwiGLU experts as stacked weights w1, w3 [E, dim, hidden] and w2 [E, hidden, dim] ((in, out) per expert)."""

    def __init__(self, num_experts: int, dim: int, hidden_dim: int, backend: str):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.w3 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.backend = backend

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return EXPERT_BACKENDS[self.backend](x, counts, self.w1, self.w2, self.w3)

    def init_weights(self, init_std: float, out_std: float) -> None:
        # as SwiGLU: the input projection at init_std, the others at the residual-scaled out_std
        trunc_normal_(self.w1, init_std)
        trunc_normal_(self.w2, out_std)
        trunc_normal_(self.w3, out_std)


# ----------------------------------------------------------------------------- the layer


class MoE(nn.Module):
    """Routed SwiGLU experts (+ optional shared experts) in place of a dense SwiGLU.

    forward(x [..., dim]) -> (out [..., dim], stats) with stats ``moe_load``
    ([E] fp32: token slots each expert received) and, for balance "aux",
    ``moe_aux`` (the unweighted Switch loss).
    """

    def __init__(self, dim: int, dense_hidden_dim: int, args: MoEArgs):
        super().__init__()
        self.num_experts, self.top_k = args.moe_num_experts, args.moe_top_k
        self.balance, self.score_func = args.moe_balance, args.moe_score_func
        self.bias_update_rate = args.moe_bias_update_rate
        hidden = args.moe_expert_hidden(dense_hidden_dim)
        # named "router": float8 leaves it in high precision and the optimizer does not decay it
        self.router = nn.Linear(dim, self.num_experts, bias=False)
        self.experts = GroupedExperts(self.num_experts, dim, hidden, args.moe_backend_name())
        self.shared_experts = SwiGLU(dim, hidden * args.moe_shared_experts) if args.moe_shared_experts else None
        # used by balance "bias" (zero and unused otherwise); a persistent buffer, so checkpoints hold it
        self.register_buffer("expert_bias", torch.zeros(self.num_experts, dtype=torch.float32))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(chosen experts [T, k], their gates [T, k] fp32, router scores [T, E] fp32) of tokens x [T, dim]."""
        logits = F.linear(x.float(), self.router.weight.float())
        scores = torch.sigmoid(logits) if self.score_func == "sigmoid" else torch.softmax(logits, dim=-1)
        # ranking the logits ranks the scores (both score functions are monotone in them); the bias
        # shifts the ranking only, in logit units, which saturation does not squash
        choice = logits + self.expert_bias if self.balance == "bias" else logits
        experts = choice.topk(self.top_k, dim=-1).indices
        gates = scores.gather(-1, experts)
        if self.top_k > 1:
            gates = gates / gates.sum(dim=-1, keepdim=True)
        return experts, gates, scores

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        n_tokens, k = tokens.shape[0], self.top_k
        experts, gates, scores = self.route(tokens)
        slot_expert = experts.reshape(-1)  # slot s = token s // k, its (s % k)-th choice
        order = torch.argsort(slot_expert, stable=True)
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        counts = torch.zeros(self.num_experts, dtype=torch.int64, device=x.device).scatter_add_(
            0, slot_expert, torch.ones_like(slot_expert))
        slots = tokens if k == 1 else tokens.unsqueeze(1).expand(n_tokens, k, shape[-1]).reshape(n_tokens * k, -1)
        out_sorted = self.experts(permute_rows(slots, order, inverse), counts)
        out_slots = permute_rows(out_sorted, inverse, order).view(n_tokens, k, shape[-1])
        out = (out_slots.float() * gates.unsqueeze(-1)).sum(dim=1).to(x.dtype)
        if self.shared_experts is not None:
            out = out + self.shared_experts(tokens)
        load = counts.float()
        stats = {"moe_load": load}
        if self.balance == "aux":
            stats["moe_aux"] = switch_loss(scores, load)
        return out.view(shape), stats

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor) -> None:
        """After an optimizer step: bias += rate * (mean load - load) / mean load, centred.

        `load` [E] is the step's, summed over micro-batches and data-parallel ranks, so every rank
        moves its copy the same way. An even load moves nothing; all tokens on one expert moves it
        by -(E - 1) * rate and the others by +rate (before centring).
        """
        if self.balance != "bias" or self.bias_update_rate == 0:
            return
        load = load.float()
        mean = load.mean().clamp_min(1.0)
        delta = self.bias_update_rate * (mean - load) / mean
        self.expert_bias.add_(delta - delta.mean())

    def init_weights(self, init_std: float, out_std: float) -> None:
        trunc_normal_(self.router.weight, init_std)
        self.experts.init_weights(init_std, out_std)
        if self.shared_experts is not None:
            self.shared_experts.init_weights(init_std, out_std)
        self.expert_bias.zero_()


def switch_loss(scores: torch.Tensor, load: torch.Tensor) -> torch.Tensor:
    """E * sum_i f_i * P_i: f = share of the token slots expert i got, P = its mean (normalised) score.

    Equals 1 when both are uniform; its gradient reaches the router through P only.
    """
    probs = scores / scores.sum(dim=-1, keepdim=True)  # softmax scores already sum to 1; sigmoid ones do not
    frac = load / load.sum()
    return scores.shape[-1] * (frac * probs.mean(dim=0)).sum()


# ----------------------------------------------------------------------------- model-level helpers


def build_feed_forward(dim: int, dense_hidden_dim: int, moe: MoEArgs | None) -> nn.Module:
    """The FFN of one layer: a MoE when `moe` is given (the layer carries experts), else a dense SwiGLU."""
    return MoE(dim, dense_hidden_dim, moe) if moe is not None else SwiGLU(dim, dense_hidden_dim)


def feed_forward_with_stats(ffn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(output, stats) of a layer's FFN; a dense SwiGLU has no stats."""
    if isinstance(ffn, MoE):
        return ffn(x)
    return ffn(x), {}


def _values(stats: list[dict[str, torch.Tensor]], key: str) -> list[torch.Tensor]:
    return [s[key] for s in stats if key in s]


def merge_moe_stats(per_call: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One layer's stats over several calls (MoR recursion steps): loads add up, the aux loss is averaged."""
    loads, aux = _values(per_call, "moe_load"), _values(per_call, "moe_aux")
    merged = {"moe_load": torch.stack(loads).sum(dim=0)} if loads else {}
    if aux:
        merged["moe_aux"] = torch.stack(aux).mean()
    return merged


def moe_model_outputs(per_layer: list[dict[str, torch.Tensor]], args: MoEArgs
                      ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """(weighted aux term for `aux_loss` or None, outputs `moe_load` [L_moe, E] and `moe_aux_loss`)."""
    loads, aux = _values(per_layer, "moe_load"), _values(per_layer, "moe_aux")
    outputs = {"moe_load": torch.stack(loads).detach()} if loads else {}
    if not aux:
        return None, outputs
    mean_aux = torch.stack(aux).mean()
    outputs["moe_aux_loss"] = mean_aux.detach()
    return (args.moe_aux_weight * mean_aux if args.moe_aux_weight != 0 else None), outputs


def moe_layers(model: nn.Module) -> list[MoE]:
    """The MoE layers of a model in forward order (the row order of its `moe_load` output).

    The trainer looks them up once; a module walk per step would be host time on the hot path.
    """
    return [m for m in model.modules() if isinstance(m, MoE)]


def update_expert_biases(layers: list[MoE], load: torch.Tensor) -> None:
    """Apply one step's global loads [L_moe, E] to the biases of `layers` (= `moe_layers(model)`);
    a no-op for layers whose balance is not "bias"."""
    if load.shape[0] != len(layers):
        raise ValueError(f"expert loads for {load.shape[0]} MoE layers, but the model has {len(layers)}")
    for moe, row in zip(layers, load):
        moe.update_bias(row)


def expert_load_summary(load: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per MoE layer (rows of load [L, E]): max/min load (min clamped to one slot, so a dead expert
    gives max/1), entropy of the load shares over log E (1 = perfectly even), experts with no token."""
    load = load.float()
    share = load / load.sum(dim=-1, keepdim=True).clamp_min(1.0)
    entropy = -(share * share.clamp_min(1e-12).log()).sum(dim=-1) / math.log(max(load.shape[-1], 2))
    return {"max_over_min": load.max(dim=-1).values / load.min(dim=-1).values.clamp_min(1.0),
            "entropy": entropy, "dead_experts": (load == 0).sum(dim=-1).float()}


def ffn_active_params(args: MoEArgs, dim: int, dense_hidden_dim: int, moe: bool) -> int:
    """Weights one token multiplies through in a layer's FFN: a dense SwiGLU, or a MoE's router, its k
    experts and the shared ones."""
    if not moe:
        return 3 * dim * dense_hidden_dim
    hidden = args.moe_expert_hidden(dense_hidden_dim)
    return dim * args.moe_num_experts + (args.moe_top_k + args.moe_shared_experts) * 3 * dim * hidden
