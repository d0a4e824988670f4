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

With `cuda_graph=True` (CUDA, cached) the one-token decode step is recorded once as a CUDA graph and
replayed (`CapturedDecodeStep`): an eager step of a 1B model at batch 1 spends its time dispatching
hundreds of small kernels from Python, a replay launches them all at once. A replay still runs every
one of those kernels, and routed families have thousands of tiny elementwise ones; with
`compile_step=True` the blocks are compiled first (`CompiledDecodeStep`, inductor), which fuses them,
and the compiled step is what gets recorded.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..distributed.cuda_graph import run_on_side_stream
from ..models.common.decoder import Decoder


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


def _to_host_async(ids: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """A copy of ids on the host and, on CUDA, the event after which it holds them. The sampled
    ids are read one step late: the next step is queued before the host waits, so the device never
    idles while the host launches it."""
    if ids.device.type != "cuda":
        return ids, None
    on_host = ids.to("cpu", non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    return on_host, ready


def _device_and_max_len(model: nn.Module) -> tuple[torch.device, int]:
    return next(model.parameters()).device, model.args.max_seq_len


def _why(e: Exception) -> str:
    """What a compile failure of CompiledDecodeStep means, in words."""
    if isinstance(e, torch._dynamo.exc.Unsupported):
        return "a block does not compile whole (a graph break)"
    if isinstance(e, torch._dynamo.exc.RecompileError):
        return "a block would compile again at a later token"
    return "its blocks reached dynamo's recompile limit (too many kinds of block or decode shapes)"


class CompiledDecodeStep:
    """`model(tokens [B, 1], cache=cache)["logits"][:, -1]` with every block run through torch.compile.

    What `CapturedDecodeStep(compile=True)` records; on its own, a compiled step without a graph (the
    CPU tests run it so). Why the blocks and not the whole call: the step's host bookkeeping
    (`DecodeCache.begin` checks the fill level `appended`, a Python int, and `advance` bumps it) would
    be a guard on a value that changes at every token, so a compiled `model(...)` recompiles at every
    step. `Decoder.run_layers(blocks=...)` keeps that bookkeeping, the embedding and the head eager (a
    handful of kernels) and calls each compiled block with its `CacheView`, whose guards (the keys of
    the state tree, the shapes of its tensors) hold from one token to the next once every module's
    state exists, which the prefill ensures. Blocks of one structure share one compiled graph (dynamo
    lifts their parameters as inputs), so a model compiles once per kind of block, not once per layer.
    The logits are `run_layers`' own: the family's forward only adds losses and routing statistics.

    The first call compiles: inductor's default mode (the CUDA graph is CapturedDecodeStep's, not
    mode="reduce-overhead"'s), `dynamic=False` (a decode step has one shape: each new batch size or
    cache length compiles again), `fullgraph=True`. A block that does not compile whole, or a later
    call that would compile again (a guard that changes from token to token: it would recompile at
    every step, and inside a CUDA-graph capture), raises ValueError: that family must decode
    uncompiled. `backend` is torch.compile's (the CPU tests use cheaper ones).
    """

    def __init__(self, model: nn.Module, cache, backend: str | Callable = "inductor"):
        if not isinstance(model, Decoder):
            raise ValueError(f"a compiled decode step compiles a Decoder's blocks, got {type(model).__name__}")
        self.model, self.cache = model, cache
        self.blocks = [torch.compile(block, backend=backend, fullgraph=True, dynamic=False)
                       for block in model.layers.values()]
        self.compiled = False  # set by the first call, after which nothing may compile again

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        no_recompile = (torch._dynamo.config.patch(error_on_recompile=True) if self.compiled
                        else contextlib.nullcontext())
        try:
            with no_recompile:
                logits = self.model.run_layers(tokens, cache=self.cache, blocks=self.blocks)[0][:, -1]
        except (torch._dynamo.exc.Unsupported, torch._dynamo.exc.RecompileError,
                torch._dynamo.exc.FailOnRecompileLimitHit) as e:
            kinds = ", ".join(sorted({type(b).__name__ for b in self.model.layers.values()}))
            raise ValueError(f"{type(self.model).__name__} cannot run its decode step compiled: {_why(e)}, in its "
                             f"blocks ({kinds}); decode it uncompiled. {e}") from e
        self.compiled = True
        return logits


class CapturedDecodeStep:
    """`model(tokens [B, 1], cache=cache)["logits"][:, -1]`, recorded once as a CUDA graph and replayed.

    It relies on the decode protocol's static step (models/common/cache.py): at T = 1 every state
    tensor of the cache is updated in place and nothing is read back to the host, so the recorded
    kernels read and write the same memory at each replay. Creating it runs one real step eagerly on
    a side stream (the warm-up CUDA asks for before a capture) and then records a second one, which
    executes nothing; each call replays it for the next token. The returned logits are the graph's
    output buffer, overwritten by the next call.

    `compile=True` records a `CompiledDecodeStep` instead: the warm-up step (a real one, whose logits
    are `first` as always) is where its blocks compile, so the recording only replays compiled code;
    a family whose step would compile again there raises ValueError.
    """

    def __init__(self, model: nn.Module, cache, tokens: torch.Tensor, compile: bool = False):
        if tokens.device.type != "cuda":
            raise ValueError(f"cuda_graph needs the model on a CUDA device, got {tokens.device}")
        self.cache, self.tokens = cache, tokens.clone()
        # no closure over self: in a reference cycle the graph would be freed by the garbage collector,
        # at any moment, perhaps in the middle of a later capture (which that invalidates)
        step = (CompiledDecodeStep(model, cache) if compile
                else lambda t: model(t, cache=cache)["logits"][:, -1])
        stream = torch.cuda.Stream()
        self.first = run_on_side_stream(stream, step, self.tokens)  # a real step: it advances the cache (and compiles)
        self.graph = torch.cuda.CUDAGraph()
        appended = cache.appended
        try:
            with torch.cuda.graph(self.graph, stream=stream):
                self.logits = step(self.tokens)  # recorded, not run: the host counter is put back
        finally:
            cache.appended = appended

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.cache.appended + 1 > self.cache.max_len:
            raise ValueError(f"decode cache full: {self.cache.appended + 1} tokens exceed max_len {self.cache.max_len}")
        self.tokens.copy_(tokens)
        self.graph.replay()
        self.cache.appended += 1
        return self.logits


@torch.no_grad()
def generate(model: nn.Module, prompt_ids, max_new_tokens: int, *, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, seed: int | None = None, stop_ids: Sequence[int] = (), use_cache: bool = True,
             cuda_graph: bool = False, compile_step: bool = False,
             on_tokens: Callable[[list[int | None]], None] | None = None) -> list[list[int]]:
    """New tokens for each prompt (a list of id lists, or one list), stopping a row at a stop id
    (kept) or after `max_new_tokens`. A prompt longer than the model's max_seq_len is an error; the
    continuation stops where the longest row reaches it. `cuda_graph`: replay the decode step as a
    CUDA graph (CUDA, with the cache). `compile_step` (with `cuda_graph`): compile the blocks of the
    recorded step first (`CompiledDecodeStep`); the first call for a batch size and cache length
    (longest prompt + new tokens) pays the compile. `on_tokens` gets each step's token per row (None
    for a finished row), for streaming."""
    cfg = SamplingConfig(temperature, top_k, top_p)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if cuda_graph and not use_cache:
        raise ValueError("cuda_graph replays the cached decode step; it needs use_cache=True")
    if compile_step and not cuda_graph:
        raise ValueError("compile_step compiles the decode step that cuda_graph records; it needs cuda_graph=True")
    rows = _as_rows(prompt_ids)
    device, max_seq_len = _device_and_max_len(model)
    longest = max(len(r) for r in rows)
    if longest > max_seq_len:
        raise ValueError(f"a prompt of {longest} tokens exceeds the model's max_seq_len {max_seq_len}")
    steps = min(max_new_tokens, max_seq_len - longest)
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph needs the model on a CUDA device, got {device}")
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
        captured: CapturedDecodeStep | None = None
        if use_cache:
            cache = model.init_cache(len(rows), longest + steps, device)
            last = model(tokens, cache=cache, valid=valid)["logits"][batch, lengths - 1]
        else:
            buffer = torch.zeros(len(rows), longest + steps, dtype=torch.long, device=device)
            buffer[:, :longest] = tokens
            last = model(tokens)["logits"][batch, lengths - 1]

        def take(ids: torch.Tensor, ready: torch.cuda.Event | None) -> bool:
            """Record one step's ids; True when every row has stopped."""
            if ready is not None:
                ready.synchronize()
            shown: list[int | None] = []
            for i, t in enumerate(ids.tolist()):
                shown.append(None if done[i] else t)
                if not done[i]:
                    out[i].append(t)
                    done[i] = t in stops
            if on_tokens is not None:
                on_tokens(shown)
            return all(done)

        pending = None  # the previous step's ids, on their way to the host
        for step in range(steps):
            next_ids = sample_next(last, cfg, generator)
            on_host = _to_host_async(next_ids)
            if step < steps - 1:  # queued before the host waits for any ids (the step needs none)
                if captured is not None:
                    last = captured(next_ids[:, None])
                elif cuda_graph:  # the first decode step runs eagerly, then is recorded
                    captured = CapturedDecodeStep(model, cache, next_ids[:, None], compile=compile_step)
                    last = captured.first
                elif use_cache:  # one new token per row, at that row's own position
                    last = model(next_ids[:, None], cache=cache)["logits"][:, -1]
                else:          # the whole sequence again; what lies past a row's end cannot reach it
                    buffer[batch, lengths] = next_ids
                    lengths = lengths + 1
                    last = model(buffer[:, :int(lengths.max())])["logits"][batch, lengths - 1]
            if pending is not None and take(*pending):
                break  # the step just queued is past every row's stop: its token is dropped
            pending = on_host
        else:
            if pending is not None:
                take(*pending)
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
