"""The decode protocol shared by every family (DESIGN §3.11): caches for token-by-token generation.

    cache = model.init_cache(batch, max_len, device, dtype)
    out = model(prompt, cache=cache, valid=mask)      # prefill: appends the prompt
    out = model(next_tokens, cache=cache)             # decode: appends one token per row

A `DecodeCache` is a tree of plain dicts, one namespace per module that keeps state (a layer, a
recursion step, an attention, an SSM), plus each row's length. Every stateful module reads and writes
its own namespace through a `CacheView`, which also carries `valid` [B, T]: which rows of the
module's current input are real. Valid entries always come first in a row (right padding): the
prompts of a batch have different lengths, and a routed block gets a right-padded selection
(DESIGN §3.4). Padding never enters a state:
* attention K/V (`KVCache`): every call appends T entries at one offset for all rows, and a
  key-valid mask hides the padding, so a row's keys stay in causal order;
* convolution windows (`extend_with_window`): the last K-1 *valid* inputs of each row;
* SSM states: a padding token gets no input and no decay (the mixer's own code).

Decoding runs in eval mode (threshold routing). A one-token step (T = 1) has static shapes and no
host sync (a routed block masks its one token instead of selecting) and updates every state tensor in
place, K/V at a device-side offset over the whole preallocated buffer: so the step can be recorded
once as a CUDA graph and replayed (`components/generation.py::CapturedDecodeStep`). A prefill
(T > 1) routes by data-dependent counts and runs eagerly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F


@dataclass
class DecodeCache:
    """What `model.init_cache` returns: the per-module state tree and each row's length so far."""

    batch: int
    max_len: int
    device: torch.device
    dtype: torch.dtype
    lengths: torch.Tensor = field(init=False)  # [B] tokens appended per row (the next token's position)
    store: dict[str, Any] = field(init=False, default_factory=dict)
    appended: int = field(init=False, default=0)  # entries each row holds, padding included (host side)

    def __post_init__(self) -> None:
        if self.batch < 1 or self.max_len < 1:
            raise ValueError(f"init_cache needs batch >= 1 and max_len >= 1, got {self.batch} and {self.max_len}")
        self.device = torch.device(self.device)
        self.lengths = torch.zeros(self.batch, dtype=torch.long, device=self.device)

    def begin(self, tokens: torch.Tensor, positions: torch.Tensor | None, valid: torch.Tensor | None,
              max_seq_len: int) -> tuple[torch.Tensor, "CacheView"]:
        """Check one call's input; return its positions and the root view. Positions default to
        each row's length + 0..T-1."""
        bsz, seq_len = tokens.shape
        if bsz != self.batch:
            raise ValueError(f"the cache was made for batch {self.batch}, got tokens of batch {bsz}")
        if valid is None:
            valid = torch.ones(bsz, seq_len, dtype=torch.bool, device=tokens.device)
        elif valid.shape != tokens.shape or valid.dtype != torch.bool:
            raise ValueError(f"valid must be a bool mask of the tokens' shape {tuple(tokens.shape)}, "
                             f"got {valid.dtype} {tuple(valid.shape)}")
        if positions is None:
            positions = self.lengths[:, None] + torch.arange(seq_len, device=tokens.device)
        end = self.appended + seq_len
        if end > min(self.max_len, max_seq_len):
            raise ValueError(f"decode cache full: {end} tokens exceed max_len {self.max_len} of init_cache "
                             f"or the model's max_seq_len {max_seq_len}")
        return positions, CacheView(self.store, valid, self)

    def advance(self, valid: torch.Tensor) -> None:
        self.lengths += valid.sum(dim=1)
        self.appended += valid.shape[1]


@dataclass
class CacheView:
    """One module's namespace in the cache and the validity of that module's current input rows."""

    store: dict[str, Any]
    valid: torch.Tensor        # [B, T] bool, valid entries first in each row
    cache: DecodeCache

    def child(self, name: str, valid: torch.Tensor | None = None) -> "CacheView":
        """The namespace `name` below this one; `valid` for a module that sees a routed selection."""
        return CacheView(self.store.setdefault(name, {}), self.valid if valid is None else valid, self.cache)

    def get(self, name: str, make: Callable[[], Any]) -> Any:
        if name not in self.store:
            self.store[name] = make()
        return self.store[name]


def child_view(cache: CacheView | None, name: str, valid: torch.Tensor | None = None) -> CacheView | None:
    """`cache.child(name, valid)`, or None outside decoding: what a module passes to its sub-modules."""
    return None if cache is None else cache.child(name, valid)


def extend_with_window(view: CacheView, name: str, x: torch.Tensor, size: int) -> torch.Tensor:
    """[window ; x]: the last `size` valid inputs of each row before this call, then x [B, T, ...].

    A causal conv of kernel size+1 over the result gives, at the last T rows, what it gives in a
    full-sequence forward (zeros before the start, like the convs' own padding). The window then
    moves to the last `size` valid rows.
    """
    if size == 0:
        return x
    window = view.get(name, lambda: x.new_zeros((x.shape[0], size, *x.shape[2:])))
    ext = torch.cat([window.to(x.dtype), x], dim=1)
    counts = view.valid.sum(dim=1)
    idx = counts[:, None] + torch.arange(size, device=x.device)  # rows [count, count + size) of ext
    window.copy_(ext.gather(1, idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])))
    return ext


class KVCache:
    """Keys and values of one attention, preallocated for max_len entries of every row, with each
    entry's token position (for windowed attention) and validity.

    The fill level is a device tensor and attention always reads the whole buffer (unwritten
    entries are invalid): no call depends on a host-side offset, so a captured step replays."""

    def __init__(self, batch: int, max_len: int, heads: int, head_dim: int, device, dtype):
        self.k = torch.zeros(batch, max_len, heads, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.key_valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.key_pos = torch.zeros(batch, max_len, dtype=torch.long, device=device)
        self.key_at = torch.arange(max_len, device=device)
        self.offset = torch.zeros((), dtype=torch.long, device=device)  # entries written per row

    @classmethod
    def of(cls, view: CacheView, heads: int, head_dim: int) -> "KVCache":
        c = view.cache
        return view.get("kv", lambda: cls(c.batch, c.max_len, heads, head_dim, c.device, c.dtype))

    def append(self, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, positions: torch.Tensor | None = None,
               window: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Append k, v [B, T, Hkv, D]; return the whole key and value buffers and the mask [B, T, L] of
        the keys each new query may read: valid, not after it, within `window` positions if given.

        A module never gets more entries per call than the model's input has tokens, so
        `DecodeCache.begin`'s check bounds every buffer."""
        query_at = self.offset + torch.arange(k.shape[1], device=k.device)  # [T] buffer slots
        self.k.index_copy_(1, query_at, k.to(self.k.dtype))
        self.v.index_copy_(1, query_at, v.to(self.v.dtype))
        self.key_valid.index_copy_(1, query_at, valid)
        if positions is not None:
            self.key_pos.index_copy_(1, query_at, positions)
        self.offset += k.shape[1]
        mask = (self.key_at[None, :] <= query_at[:, None]) & self.key_valid[:, None, :]  # [B, T, L]
        if window is not None:
            mask = mask & (self.key_pos[:, None, :] > positions[:, :, None] - window)
        # a padding query keeps its own key, so its (ignored) row never softmaxes over nothing
        return self.k, self.v, mask | (self.key_at[None, :] == query_at[:, None])

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor,
               scale: float | None = None) -> torch.Tensor:
        """Append k, v [B, T, Hkv, D] and attend q [B, T, Hq, D] over every valid cached key up to itself."""
        keys, values, mask = self.append(k, v, valid)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys.transpose(1, 2).to(q.dtype), values.transpose(1, 2).to(q.dtype),
            attn_mask=mask[:, None], scale=scale, enable_gqa=q.shape[2] != k.shape[2])
        return out.transpose(1, 2)
