"""Activation checkpointing per block: none | full | selective (op-level save list).

`full` recomputes the whole block in backward. `selective` saves the outputs
of the expensive ops (matmuls, the MoE experts' grouped GEMMs, attention) and
recomputes the cheap elementwise ones (norms, activations, convolution shifts,
RoPE, MoE routing) — most of the memory saving of full AC for a fraction of its
recompute.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts


def default_save_ops() -> set[Any]:
    aten = torch.ops.aten
    grouped_mm = {aten._grouped_mm.default} if hasattr(aten, "_grouped_mm") else set()  # MoE experts
    return grouped_mm | {
        aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default,
        aten._scaled_mm.default,  # float8 GEMMs (torchao): recomputing them would undo their gain
        aten.max.default,  # float8 tensorwise amax: a scalar, whose recompute is a full pass over its input
        aten._scaled_dot_product_efficient_attention.default,
        aten._scaled_dot_product_flash_attention.default,
        aten._scaled_dot_product_cudnn_attention.default,
        aten._scaled_dot_product_flash_attention_for_cpu.default}


def _selective_context_fn(save_ops: frozenset) -> Callable:
    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in save_ops else CheckpointPolicy.PREFER_RECOMPUTE

    return functools.partial(create_selective_checkpoint_contexts, policy)


def apply_activation_checkpointing(model: nn.Module, mode: str, extra_save_ops: tuple = ()) -> None:
    """Wrap every block of `model.layers` in place."""
    if mode == "none":
        return
    if mode not in ("full", "selective"):
        raise ValueError(f"activation_checkpoint.mode must be none | full | selective, got {mode!r}")
    kwargs: dict[str, Any] = {}
    if mode == "selective":
        kwargs["context_fn"] = _selective_context_fn(frozenset(default_save_ops() | set(extra_save_ops)))
    for layer_id, block in list(model.layers.items()):
        model.layers[layer_id] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT,
                                                    preserve_rng_state=False, **kwargs)
