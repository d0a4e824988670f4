"""Input checks that every model's forward runs before touching the embedding."""

from __future__ import annotations

import torch


def _capturing(tokens: torch.Tensor) -> bool:
    """Inside a CUDA graph capture (a decode step, whose tokens the sampler produced)."""
    return tokens.device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def check_token_ids(tokens: torch.Tensor, vocab_size: int, max_seq_len: int) -> None:
    """Fail clearly on bad token ids instead of crashing the device.

    Out-of-range ids make a CUDA embedding kernel hit a device-side assert
    that poisons the process. Shapes are checked always (free). Ids are
    checked exactly for CPU tensors in eager mode; for accelerator tensors an
    asynchronous device assert is queued instead, so the check never forces a
    host sync in the training step. Under torch.compile and CUDA graph capture the id
    check is skipped.
    """
    if tokens.dim() != 2:
        raise ValueError(f"tokens must have shape [batch, seq_len], got {tuple(tokens.shape)}")
    if tokens.shape[1] > max_seq_len:
        raise ValueError(f"sequence length {tokens.shape[1]} exceeds max_seq_len={max_seq_len}")
    if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
        raise TypeError(f"tokens must be an integer tensor, got {tokens.dtype}")
    if torch.compiler.is_compiling() or tokens.numel() == 0 or _capturing(tokens):
        return
    if tokens.device.type == "cpu":
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"token ids must be in [0, {vocab_size}) (vocab_size), got min {lo}, max {hi}")
    elif tokens.device.type != "meta":
        torch._assert_async(((tokens >= 0) & (tokens < vocab_size)).all(),
                            f"token ids out of range [0, {vocab_size})")
