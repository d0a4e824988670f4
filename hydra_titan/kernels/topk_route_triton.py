"""Top-k token selection of one routing step in one Triton kernel (the `triton` path of `topk_route.py`).

One program per row of router scores [B, M] (the whole row in registers):
  1. map each fp32 score to an int32 key with the same order (negative floats: flip the 31 low bits);
  2. find the k-th largest key exactly by setting its bits from the top: 32 counting passes over the
     row in registers (no sort, no global memory);
  3. keep the keys above it, and of those equal to it the first ones in position order until k are
     kept (a cumulative count), so ties resolve deterministically;
  4. write the kept positions in increasing order at their running count (a stream compaction),
     optionally through a `source` map (the positions those scores stand for), and the 0/1 row of
     the selection (the routers' BCE target).
This replaces the step's topk, the sort of its indices, the scatter of the target and the gather of
the positions: four to six kernels (topk alone is several on CUDA) for one launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _topk_route_kernel(scores_ptr, source_ptr, idx_ptr, target_ptr, M, K,
                       HAS_SOURCE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    inb = offs < M
    x = tl.load(scores_ptr + row * M + offs, mask=inb, other=0.0).to(tl.float32)
    bits = x.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)   # int32 order == float order (NaN above +inf)

    # the k-th largest key: its sign first, then bits 30..0, each kept if k keys still reach it
    n_nonneg = tl.sum(((key >= 0) & inb).to(tl.int32), axis=0)
    thr = tl.where(n_nonneg >= K, 0, -2147483648)
    for bit in tl.static_range(30, -1, -1):
        cand = thr + (1 << bit)
        count = tl.sum(((key >= cand) & inb).to(tl.int32), axis=0)
        thr = tl.where(count >= K, cand, thr)

    above = (key > thr) & inb
    at = (key == thr) & inb
    need = K - tl.sum(above.to(tl.int32), axis=0)
    keep = above | (at & (tl.cumsum(at.to(tl.int32), axis=0) <= need))
    slot = tl.cumsum(keep.to(tl.int32), axis=0) - 1
    if HAS_SOURCE:
        value = tl.load(source_ptr + row * M + offs, mask=inb, other=0)
    else:
        value = offs.to(tl.int64)
    tl.store(idx_ptr + row * K + slot, value, mask=keep)
    tl.store(target_ptr + row * M + offs, keep.to(tl.float32), mask=inb)


def topk_route(scores: torch.Tensor, k: int, source: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions [B, k] int64 in increasing order, 0/1 target [B, M] in the scores' dtype)."""
    bsz, m = scores.shape
    scores = scores.contiguous()
    idx = torch.empty((bsz, k), dtype=torch.int64, device=scores.device)
    target = torch.empty_like(scores)
    block = triton.next_power_of_2(m)
    num_warps = 4 if block <= 1024 else 8 if block <= 4096 else 16
    _topk_route_kernel[(bsz,)](scores, source.contiguous() if source is not None else idx, idx, target, m, k,
                               HAS_SOURCE=source is not None, BLOCK=block, num_warps=num_warps)
    return idx, target
