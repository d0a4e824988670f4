"""Sampling and scoring with any registered model (DESIGN §3.11).

`generate` samples continuations of a batch of prompts, `loglikelihood` scores a continuation (the
call an lm-eval-harness adapter makes). Both run the model in eval mode, so routed families route
causally by threshold, exactly as in validation.

Prompts of different lengths are batched by right padding with a per-row `valid` mask: each row
keeps its own positions (0..len-1, then len, len+1, ...) and no padding token enters any cache
state, so a row generates what it would generate alone. With `use_cache=False` every step
recomputes the whole (right-padded) sequence instead: causal models ignore what lies after a
row's last token, so both paths give the same tokens; the recompute path is the reference and the
baseline of the decode benchmark.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 = greedy; top_k 0 and top_p 1 = no truncation."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def sample_next(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row from logits [B, V] (fp32): greedy, or temperature -> top-k -> top-p -> sample."""
    logits = logits.float()
    if cfg.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / cfg.temperature
    if cfg.top_k:
        kth = logits.topk(min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the ones ranked above it already hold top_p (the first is always kept)
        drop = probs.cumsum(dim=-1) - probs >= cfg.top_p
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def _as_rows(prompt_ids: Sequence[Sequence[int]] | Sequence[int] | torch.Tensor) -> list[list[int]]:
    if isinstance(prompt_ids, torch.Tensor):
        prompt_ids = prompt_ids.tolist() if prompt_ids.dim() == 2 else [prompt_ids.tolist()]
    rows = list(prompt_ids)
    if rows and not isinstance(rows[0], (list, tuple)):
        rows = [rows]  # one prompt
    rows = [list(map(int, r)) for r in rows]
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("generate needs at least one prompt and no empty prompt")
    return rows


def _right_padded(rows: list[list[int]], width: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = torch.tensor(r)
    lengths = torch.tensor([len(r) for r in rows])
    return tokens.to(device), (torch.arange(width) < lengths[:, None]).to(device)


def _device_and_max_len(model: nn.Module) -> tuple[torch.device, int]:
    return next(model.parameters()).device, model.args.max_seq_len


@torch.no_grad()
def generate(model: nn.Module, prompt_ids, max_new_tokens: int, *, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, seed: int | None = None, stop_ids: Sequence[int] = (), use_cache: bool = True,
             on_tokens: Callable[[list[int | None]], None] | None = None) -> list[list[int]]:
    """New tokens for each prompt (a list of id lists, or one list), stopping a row at a stop id
    (kept) or after `max_new_tokens`. A prompt longer than the model's max_seq_len is an error; the
    continuation stops where the longest row reaches it. `on_tokens` gets each step's token per row
    (None for a finished row), for streaming."""
    cfg = SamplingConfig(temperature, top_k, top_p)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    rows = _as_rows(prompt_ids)
    device, max_seq_len = _device_and_max_len(model)
    longest = max(len(r) for r in rows)
    if longest > max_seq_len:
        raise ValueError(f"a prompt of {longest} tokens exceeds the model's max_seq_len {max_seq_len}")
    steps = min(max_new_tokens, max_seq_len - longest)
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    stops = {int(s) for s in stop_ids}
    out: list[list[int]] = [[] for _ in rows]
    done = [False] * len(rows)
    was_training = model.training
    model.eval()
    try:
        tokens, valid = _right_padded(rows, longest, device)
        batch = torch.arange(len(rows), device=device)
        lengths = valid.sum(dim=1)
        if use_cache:
            cache = model.init_cache(len(rows), longest + steps, device)
            last = model(tokens, cache=cache, valid=valid)["logits"][batch, lengths - 1]
        else:
            buffer = torch.zeros(len(rows), longest + steps, dtype=torch.long, device=device)
            buffer[:, :longest] = tokens
            last = model(tokens)["logits"][batch, lengths - 1]
        for step in range(steps):
            next_ids = sample_next(last, cfg, generator)
            shown: list[int | None] = []
            for i, t in enumerate(next_ids.tolist()):
                shown.append(None if done[i] else t)
                if not done[i]:
                    out[i].append(t)
                    done[i] = t in stops
            if on_tokens is not None:
                on_tokens(shown)
            if all(done) or step == steps - 1:
                break
            if use_cache:  # one new token per row, at that row's own position
                last = model(next_ids[:, None], cache=cache)["logits"][:, -1]
            else:          # the whole sequence again; what lies past a row's end cannot reach it
                buffer[batch, lengths] = next_ids
                lengths = lengths + 1
                last = model(buffer[:, :int(lengths.max())])["logits"][batch, lengths - 1]
        return out
    finally:
        model.train(was_training)


@dataclass(frozen=True)
class LogLikelihood:
    logprob: float     # sum of log p(continuation token | everything before it), nats
    is_greedy: bool    # every continuation token was the argmax


@torch.no_grad()
def loglikelihood(model: nn.Module, context_ids: Sequence[int], continuation_ids: Sequence[int]) -> LogLikelihood:
    """log p(continuation | context) under one eval forward of context + continuation.

    As lm-eval-harness does, a sequence longer than max_seq_len keeps its last max_seq_len + 1
    tokens (the continuation must fit)."""
    context, continuation = [int(t) for t in context_ids], [int(t) for t in continuation_ids]
    if not continuation:
        raise ValueError("loglikelihood needs a non-empty continuation")
    device, max_seq_len = _device_and_max_len(model)
    if len(continuation) > max_seq_len:
        raise ValueError(f"a continuation of {len(continuation)} tokens exceeds max_seq_len {max_seq_len}")
    full = (context + continuation)[-(max_seq_len + 1):]
    if len(full) <= len(continuation):
        raise ValueError("loglikelihood needs at least one context token before the continuation")
    was_training = model.training
    model.eval()
    try:
        tokens = torch.tensor(full[:-1], device=device)[None]
        logprobs = model(tokens)["logits"][0, -len(continuation):].float().log_softmax(dim=-1)
    finally:
        model.train(was_training)
    target = torch.tensor(continuation, device=device)
    picked = logprobs.gather(1, target[:, None]).squeeze(1)
    return LogLikelihood(float(picked.sum()), bool((logprobs.argmax(dim=-1) == target).all()))
