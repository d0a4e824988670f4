"""Training loss: token cross-entropy (plain or chunked), z-loss, model aux terms.

Why sums: with gradient accumulation and data parallelism the step's loss is
the mean over *all* target tokens of the step (every micro-batch, every
data-parallel rank). Averaging per micro-batch and then averaging the averages
weights tokens unequally when micro-batches hold different numbers of target
tokens (padding, ignore_index). So the per-token terms are computed as sums
and divided by the global count, which the trainer computes once per step.

Why chunked: the fp32 copy of ``[tokens, vocab]`` logits is the biggest
tensor of a step for large vocabularies. ``chunked_cross_entropy_sum``
computes loss *and* gradient chunk by chunk in the forward pass, keeping only
the gradient (in the logits' dtype) for the backward, so at most one chunk of
fp32 logits is alive at a time.

Nothing here calls ``.item()`` / ``.cpu()``: every result stays a tensor.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

__all__ = [
    "IGNORE_INDEX",
    "LossFn",
    "build_loss_fn",
    "chunked_cross_entropy_sum",
    "count_target_tokens",
    "cross_entropy_sum",
    "plain_token_sums",
    "z_loss",
    "z_loss_sum",
]

IGNORE_INDEX = -100


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half types, the input dtype when it is already >= fp32."""
    return torch.promote_types(dtype, torch.float32)


def _flatten(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., V] logits and [...] labels -> [N, V] and [N]."""
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree: "
            "expected logits [..., V] and labels [...]"
        )
    return logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)


def bytes_of_targets(labels: torch.Tensor, token_bytes: torch.Tensor, ignore_index: int = IGNORE_INDEX
                     ) -> torch.Tensor:
    """UTF-8 bytes of the target tokens (``token_bytes`` [V]: bytes per id), as an int64 tensor."""
    keep = labels != ignore_index
    return (token_bytes[labels.masked_fill(~keep, 0)] * keep).sum()


def count_target_tokens(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Number of labels that are not ``ignore_index``, as an int64 tensor (no host sync).

    The trainer sums this over micro-batches and all-reduces it over
    data-parallel ranks to get ``num_global_tokens``.
    """
    return (labels != ignore_index).sum()


def cross_entropy_sum(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Sum of token cross-entropies, computed on fp32 logits (upcast here)."""
    flat_logits, flat_labels = _flatten(logits, labels)
    return F.cross_entropy(
        flat_logits.to(_compute_dtype(flat_logits.dtype)),
        flat_labels,
        ignore_index=ignore_index,
        reduction="sum",
    )


def z_loss_sum(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Sum over target tokens of ``logsumexp(logits)^2`` in fp32."""
    flat_logits, flat_labels = _flatten(logits, labels)
    lse = torch.logsumexp(flat_logits.to(_compute_dtype(flat_logits.dtype)), dim=-1)
    mask = (flat_labels != ignore_index).to(lse.dtype)
    return (lse.square() * mask).sum()


def z_loss(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """PaLM z-loss: mean over target tokens of ``logsumexp(logits)^2`` (fp32).

    It keeps the softmax normaliser near 1 (log near 0), which keeps bf16
    logits in range. Returns 0 when no token is a target.
    """
    count = count_target_tokens(labels, ignore_index).clamp(min=1)
    return z_loss_sum(logits, labels, ignore_index) / count


def plain_token_sums(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, with_z: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(CE sum, z sum) of [..., V] logits; z is 0 unless asked for (it costs a full lse)."""
    upcast = logits.to(_compute_dtype(logits.dtype))  # one fp32 copy shared by both
    ce_sum = cross_entropy_sum(upcast, labels, ignore_index)
    if not with_z:
        return ce_sum, torch.zeros_like(ce_sum)
    return ce_sum, z_loss_sum(upcast, labels, ignore_index)


@functools.cache
def _compiled_plain_token_sums() -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """`plain_token_sums` under torch.compile (built once, on first use).

    Inductor fuses the upcast, the log-softmax and the target pick into
    reductions that read the bf16 logits once, and writes the gradient in
    bf16: no fp32 [tokens, vocab] tensor is materialised, and the eager
    softmax kernels (~9 ms per 8k tokens at a 100k vocabulary on an H100) go.
    """
    return torch.compile(plain_token_sums)


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Sums of token CE and of ``lse^2``, gradient computed in the forward.

    forward(logits [N, V], labels [N], chunk_size, ignore_index)
        -> (ce_sum, z_sum), both 0-dim in fp32 (or the logits' dtype if wider).

    Per chunk of rows: upcast a *copy* of the chunk, compute the max-shifted
    exponentials in place, the logsumexp ``lse``, the target logit, and (when a
    gradient is needed) ``G = softmax - onehot`` which is written, in the
    logits' dtype, into one preallocated ``[N, V]`` buffer. Peak extra fp32
    memory is one ``[chunk_size, V]`` buffer.

    backward(g_ce, g_z): d ce_sum / d x = G and d z_sum / d x = 2 lse P with
    P = G + onehot, so the gradient is ``G * (g_ce + 2 g_z lse) + 2 g_z lse
    onehot``: computed in place in the saved buffer (no second ``[N, V]``).
    The buffer is consumed, so the graph cannot be back-propagated twice.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        logits: torch.Tensor,
        labels: torch.Tensor,
        chunk_size: int,
        ignore_index: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        num_rows = logits.shape[0]
        compute_dtype = _compute_dtype(logits.dtype)
        needs_grad = ctx.needs_input_grad[0]
        mask = labels != ignore_index
        safe_labels = labels.masked_fill(~mask, 0).unsqueeze(1)  # [N, 1], valid gather index
        mask_f = mask.to(compute_dtype)
        ce_sum = torch.zeros((), dtype=compute_dtype, device=logits.device)
        z_sum = torch.zeros((), dtype=compute_dtype, device=logits.device)
        grad = torch.empty_like(logits) if needs_grad else None
        lse_all = torch.empty(num_rows, dtype=compute_dtype, device=logits.device)

        for start in range(0, num_rows, chunk_size):
            rows = slice(start, min(start + chunk_size, num_rows))
            x = logits[rows].to(compute_dtype, copy=True)  # copy: we work in place
            target = x.gather(1, safe_labels[rows]).squeeze(1)
            row_max = x.amax(dim=1, keepdim=True)
            x.sub_(row_max).exp_()
            denom = x.sum(dim=1, keepdim=True)
            lse = (denom.log() + row_max).squeeze(1)
            lse_all[rows] = lse
            ce_sum += ((lse - target) * mask_f[rows]).sum()
            z_sum += (lse.square() * mask_f[rows]).sum()
            if grad is not None:
                x.div_(denom)  # softmax
                x.scatter_add_(1, safe_labels[rows], -mask_f[rows].unsqueeze(1))
                x.mul_(mask_f[rows].unsqueeze(1))  # ignored rows get no gradient
                grad[rows] = x  # cast to the logits' dtype on copy
            del x

        if grad is not None:
            ctx.save_for_backward(grad, lse_all * mask_f, safe_labels)
        ctx.has_grad = grad is not None
        ctx.set_materialize_grads(False)
        ctx.consumed = False
        return ce_sum, z_sum

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_ce: torch.Tensor | None, grad_z: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, None, None, None]:
        if ctx.consumed:
            raise RuntimeError(
                "chunked cross-entropy reuses its saved gradient buffer in place: "
                "it cannot be back-propagated twice (retain_graph=True)"
            )
        if not ctx.has_grad or (grad_ce is None and grad_z is None):
            return None, None, None, None
        ctx.consumed = True
        grad, masked_lse, safe_labels = ctx.saved_tensors
        compute_dtype = masked_lse.dtype
        # 2-D scale factors so the in-place multiply computes in fp32 and rounds once.
        scale = (
            grad_ce.to(compute_dtype).reshape(1, 1)
            if grad_ce is not None
            else torch.zeros((1, 1), dtype=compute_dtype, device=grad.device)
        )
        if grad_z is None:
            grad.mul_(scale)
            return grad, None, None, None
        z_coef = (2.0 * grad_z.to(compute_dtype) * masked_lse).unsqueeze(1)  # [N, 1]
        grad.mul_(scale + z_coef)
        grad.scatter_add_(1, safe_labels, z_coef.to(grad.dtype))
        return grad, None, None, None


def _chunked_sums(
    logits: torch.Tensor, labels: torch.Tensor, chunk_size: int, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(CE sum, z sum) through the chunked autograd function."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    flat_logits, flat_labels = _flatten(logits, labels)
    return _ChunkedCrossEntropy.apply(flat_logits, flat_labels, chunk_size, ignore_index)


def chunked_cross_entropy_sum(
    logits: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """``cross_entropy_sum`` without materialising the full fp32 logits.

    Same value and gradient as the plain version; processes ``chunk_size``
    flattened tokens at a time. The graph can be back-propagated once only.
    """
    ce_sum, _ = _chunked_sums(logits, labels, chunk_size, ignore_index)
    return ce_sum


def _scalar_term(outputs: Mapping[str, torch.Tensor], key: str, like: torch.Tensor) -> torch.Tensor:
    """``outputs[key]`` as an fp32 0-dim tensor; zero when the model has none."""
    value = outputs.get(key)
    if value is None:
        return torch.zeros((), dtype=torch.float32, device=like.device)
    return value.to(torch.float32).reshape(())


@dataclass(frozen=True)
class LossFn:
    """The training loss; build it with ``build_loss_fn``.

    Contract with the trainer (gradient accumulation over M micro-batches on
    each of R data-parallel ranks)::

        loss, parts = loss_fn(outputs, labels, num_global_tokens)
        loss.backward()

    is called once per micro-batch, where ``num_global_tokens`` is
    ``count_target_tokens`` summed over the M micro-batches of the step and
    all-reduced (SUM) over the R ranks. The returned ``loss`` is this
    micro-batch's *contribution* to the step objective::

        loss = ce_sum / num_global_tokens
             + z_loss_weight * z_sum / num_global_tokens
             + micro_batch_fraction * (aux_loss_weight * aux_loss
                                       + ponder_loss_weight * ponder_loss)

    with ``micro_batch_fraction`` = local target tokens / ``num_global_tokens``
    (computed from ``labels`` when not passed). The per-micro-batch scalars
    ``aux_loss`` / ``ponder_loss`` from the model (each a mean over its
    micro-batch, already weighted by the model's own coefficients, so the
    weights here are global multipliers: 1.0 = as the model says) are thereby
    token-weighted into the step mean.

    Consequently the **sum** over micro-batches and ranks of these losses is
    the step's global mean objective, and the sum of their gradients is its
    gradient. Gradient accumulation sums by itself; the data-parallel gradient
    reduction must also be a *sum* (FSDP2 divides by the DP world size by
    default: disable that, e.g. ``set_gradient_divide_factor(1.0)``, or multiply
    the loss by the DP size). Do not divide by the number of micro-batches.

    ``parts`` has detached fp32 tensors ``ce``, ``z``, ``aux``, ``ponder``:
    the same unweighted contributions (``ce_sum / num_global_tokens``,
    ``z_sum / num_global_tokens``, ``fraction * aux``, ``fraction * ponder``),
    so summing them over micro-batches and all-reducing (SUM) over ranks gives
    the step's mean of each term, for logging, without a host sync here.
    ``z`` is 0 when ``z_loss_weight == 0`` (it is not computed then).
    ``num_global_tokens == 0`` is treated as 1 (the loss is then 0).
    """

    chunked: bool
    chunk_size: int
    z_loss_weight: float
    aux_loss_weight: float
    ponder_loss_weight: float
    ignore_index: int = IGNORE_INDEX
    compile: bool = False

    def _token_sums(
        self, logits: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(CE sum, z sum); z is 0 unless weighted (the plain path pays a full lse for it)."""
        if self.chunked:
            ce_sum, z_sum = _chunked_sums(logits, labels, self.chunk_size, self.ignore_index)
            if self.z_loss_weight == 0.0:
                z_sum = torch.zeros_like(ce_sum)  # same report as the plain path
            return ce_sum, z_sum
        sums = _compiled_plain_token_sums() if self.compile else plain_token_sums
        return sums(logits, labels, self.ignore_index, self.z_loss_weight != 0.0)

    def __call__(
        self,
        outputs: Mapping[str, torch.Tensor],
        labels: torch.Tensor,
        num_global_tokens: torch.Tensor | int,
        micro_batch_fraction: torch.Tensor | float | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = outputs["logits"]
        denom: torch.Tensor | float
        if isinstance(num_global_tokens, torch.Tensor):
            denom = num_global_tokens.to(device=logits.device, dtype=torch.float32).clamp(min=1)
        else:
            denom = float(max(num_global_tokens, 1))
        if micro_batch_fraction is None:
            micro_batch_fraction = count_target_tokens(labels, self.ignore_index) / denom

        ce_sum, z_sum = self._token_sums(logits, labels)
        ce = ce_sum.float() / denom
        z = z_sum.float() / denom
        aux = micro_batch_fraction * _scalar_term(outputs, "aux_loss", logits)
        ponder = micro_batch_fraction * _scalar_term(outputs, "ponder_loss", logits)

        total = ce
        if self.z_loss_weight != 0.0:
            total = total + self.z_loss_weight * z
        if self.aux_loss_weight != 0.0:
            total = total + self.aux_loss_weight * aux
        if self.ponder_loss_weight != 0.0:
            total = total + self.ponder_loss_weight * ponder
        parts = {"ce": ce.detach(), "z": z.detach(), "aux": aux.detach(), "ponder": ponder.detach()}
        return total, parts


def build_loss_fn(
    *,
    chunked: bool,
    chunk_size: int,
    z_loss_weight: float,
    aux_loss_weight: float,
    ponder_loss_weight: float,
    ignore_index: int = IGNORE_INDEX,
    compile: bool = False,
) -> LossFn:
    """Validate the loss options and return the ``LossFn`` (see its contract).

    ``compile`` runs the plain (unchunked) cross-entropy through torch.compile;
    the chunked path is its own memory-bounded autograd function and stays eager.
    """
    if chunked and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 when chunked=True, got {chunk_size}")
    for arg, value in (
        ("z_loss_weight", z_loss_weight),
        ("aux_loss_weight", aux_loss_weight),
        ("ponder_loss_weight", ponder_loss_weight),
    ):
        if value < 0:
            raise ValueError(f"{arg} must be >= 0, got {value}")
    loss_fn = LossFn(
        chunked=chunked,
        chunk_size=chunk_size,
        z_loss_weight=float(z_loss_weight),
        aux_loss_weight=float(aux_loss_weight),
        ponder_loss_weight=float(ponder_loss_weight),
        ignore_index=ignore_index,
        compile=compile and not chunked,
    )
    logger.info("loss: %s", loss_fn)
    return loss_fn
