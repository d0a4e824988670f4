"""Chunked SSD forward and backward in Triton (the `triton` backend of `ssd.py`).

Chunks of L = 64 tokens. Forward, two kernels:
  1. `_state_fwd`: per (batch, head) a sequential pass over the chunks that stores the state
     entering each chunk, h_c [N, P] (fp32), and updates h <- exp(g_last) h + (k·decay)^T v;
  2. `_output_fwd`: per (chunk, batch, head), in parallel:
     o = (q h_c) * exp(G) + ((q k^T) * exp(G_i - G_j) [i >= j]) v.
Backward, three kernels:
  3. `_state_bwd`: the reverse pass, dL/dh_{c+1} for every chunk;
  4. `_dv_bwd`: per (chunk, batch, head) dv = (q k^T * decay)^T do + (k * decay) dL/dh_{c+1};
  5. `_dqk_bwd`: per (chunk, batch, group, block of N) dq and dk (summed over the group's heads in
     registers) and that block's share of dG_t = q_t·dq_t - k_t·dk_t, the gradient of the
     cumulative log decay, from products already at hand (no per-head dq/dk tiles).
  dg is dG's reverse cumulative sum over the sequence (torch, innermost dim).
q and k are read per group ([B, T, G, N]); T is zero-padded to a multiple of L, which cannot
reach earlier tokens. Products run on tensor cores in the input dtype, accumulate in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

CHUNK = 64

# state tiles [BN, BP] (all fit the supported P, N >= 64): small tiles give the sequential state passes
# more programs (B·H is small for one long sequence); the tuner picks per shape
_STATE_CONFIGS = [triton.Config({"BN": bn, "BP": bp}, num_warps=4)
                  for bn, bp in ((64, 64), (32, 64), (32, 32), (16, 32), (16, 16))]



@triton.autotune(configs=_STATE_CONFIGS, key=["BH", "NC", "N", "P"])
@triton.jit
def _state_fwd(k_ptr, v_ptr, g_ptr, h_ptr, T, BH, NC, H: tl.constexpr, G: tl.constexpr,
               N: tl.constexpr, P: tl.constexpr, L: tl.constexpr, BN: tl.constexpr, BP: tl.constexpr,
               PREC: tl.constexpr):
    pid_bh, pid_n, pid_p = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = pid_bh // H, pid_bh % H
    grp = h // (H // G)
    offs_t = tl.arange(0, L)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_p = pid_p * BP + tl.arange(0, BP)
    state = tl.zeros((BN, BP), dtype=tl.float32)
    for c in range(NC):
        t = c * L + offs_t
        row = b * T + t
        h_out = h_ptr + ((pid_bh * NC + c) * N + offs_n[:, None]) * P + offs_p[None, :]
        tl.store(h_out, state)
        g = tl.load(g_ptr + row * H + h)
        g_cum = tl.cumsum(g, 0)
        g_last = tl.sum(g, 0)
        k = tl.load(k_ptr + (row[:, None] * G + grp) * N + offs_n[None, :])
        v = tl.load(v_ptr + (row[:, None] * H + h) * P + offs_p[None, :])
        k_dec = (k * tl.exp(g_last - g_cum)[:, None]).to(v.dtype)
        state = state * tl.exp(g_last) + tl.dot(tl.trans(k_dec), v, input_precision=PREC)


@triton.autotune(configs=[triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (1, 2)],
                 key=["BH", "NC", "N", "P"])
@triton.jit
def _output_fwd(q_ptr, k_ptr, v_ptr, g_ptr, h_ptr, o_ptr, T, BH, NC, H: tl.constexpr, G: tl.constexpr,
                N: tl.constexpr, P: tl.constexpr, L: tl.constexpr, PREC: tl.constexpr):
    c, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    grp = h // (H // G)
    offs_t = tl.arange(0, L)
    offs_n = tl.arange(0, N)
    offs_p = tl.arange(0, P)
    row = b * T + c * L + offs_t
    q = tl.load(q_ptr + (row[:, None] * G + grp) * N + offs_n[None, :])
    k = tl.load(k_ptr + (row[:, None] * G + grp) * N + offs_n[None, :])
    v = tl.load(v_ptr + (row[:, None] * H + h) * P + offs_p[None, :])
    g_cum = tl.cumsum(tl.load(g_ptr + row * H + h), 0)
    state = tl.load(h_ptr + ((pid_bh * NC + c) * N + offs_n[:, None]) * P + offs_p[None, :]).to(q.dtype)
    out = tl.dot(q, state, input_precision=PREC) * tl.exp(g_cum)[:, None]
    causal = offs_t[:, None] >= offs_t[None, :]
    decay = tl.exp(tl.where(causal, g_cum[:, None] - g_cum[None, :], float("-inf")))
    scores = tl.dot(q, tl.trans(k), input_precision=PREC) * decay
    out += tl.dot(scores.to(v.dtype), v, input_precision=PREC)
    tl.store(o_ptr + (row[:, None] * H + h) * P + offs_p[None, :], out.to(v.dtype))


@triton.autotune(configs=_STATE_CONFIGS, key=["BH", "NC", "N", "P"])
@triton.jit
def _state_bwd(q_ptr, g_ptr, do_ptr, dh_ptr, T, BH, NC, H: tl.constexpr, G: tl.constexpr,
               N: tl.constexpr, P: tl.constexpr, L: tl.constexpr, BN: tl.constexpr, BP: tl.constexpr,
               PREC: tl.constexpr):
    pid_bh, pid_n, pid_p = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = pid_bh // H, pid_bh % H
    grp = h // (H // G)
    offs_t = tl.arange(0, L)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_p = pid_p * BP + tl.arange(0, BP)
    dstate = tl.zeros((BN, BP), dtype=tl.float32)  # dL/dh_{c+1}
    for i in range(NC):
        c = NC - 1 - i
        row = b * T + c * L + offs_t
        tl.store(dh_ptr + ((pid_bh * NC + c) * N + offs_n[:, None]) * P + offs_p[None, :], dstate)
        g = tl.load(g_ptr + row * H + h)
        g_cum = tl.cumsum(g, 0)
        g_last = tl.sum(g, 0)
        q = tl.load(q_ptr + (row[:, None] * G + grp) * N + offs_n[None, :])
        do = tl.load(do_ptr + (row[:, None] * H + h) * P + offs_p[None, :])
        q_dec = (q * tl.exp(g_cum)[:, None]).to(do.dtype)
        dstate = dstate * tl.exp(g_last) + tl.dot(tl.trans(q_dec), do, input_precision=PREC)


@triton.autotune(configs=[triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (1, 2)],
                 key=["BH", "NC", "N", "P"])
@triton.jit
def _dv_bwd(q_ptr, k_ptr, do_ptr, g_ptr, dh_ptr, dv_ptr, T, BH, NC, H: tl.constexpr, G: tl.constexpr,
            N: tl.constexpr, P: tl.constexpr, L: tl.constexpr, PREC: tl.constexpr):
    """dv = (q k^T * decay)^T do + (k * decay to the chunk end) dL/dh_{c+1}, per (chunk, batch, head)."""
    c, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    grp = h // (H // G)
    offs_t = tl.arange(0, L)
    offs_n = tl.arange(0, N)
    offs_p = tl.arange(0, P)
    row = b * T + c * L + offs_t
    q = tl.load(q_ptr + (row[:, None] * G + grp) * N + offs_n[None, :])
    k = tl.load(k_ptr + (row[:, None] * G + grp) * N + offs_n[None, :])
    do = tl.load(do_ptr + (row[:, None] * H + h) * P + offs_p[None, :])
    g = tl.load(g_ptr + row * H + h)
    g_cum = tl.cumsum(g, 0)
    g_last = tl.sum(g, 0)
    causal = offs_t[:, None] >= offs_t[None, :]
    decay = tl.exp(tl.where(causal, g_cum[:, None] - g_cum[None, :], float("-inf")))
    scores = (tl.dot(q, tl.trans(k), input_precision=PREC) * decay).to(do.dtype)
    dstate = tl.load(dh_ptr + ((pid_bh * NC + c) * N + offs_n[:, None]) * P + offs_p[None, :]).to(k.dtype)
    k_dec = (k * tl.exp(g_last - g_cum)[:, None]).to(k.dtype)
    dv = tl.dot(tl.trans(scores), do, input_precision=PREC) + tl.dot(k_dec, dstate, input_precision=PREC)
    tl.store(dv_ptr + (row[:, None] * H + h) * P + offs_p[None, :], dv.to(do.dtype))


@triton.autotune(configs=[triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (1, 2)],
                 key=["BG", "NC", "N", "P", "HPP", "BN"])
@triton.jit
def _dqk_bwd(q_ptr, k_ptr, v_ptr, g_ptr, h_ptr, dh_ptr, do_ptr, dq_ptr, dk_ptr, dG_ptr,
             T, BG, NC, H: tl.constexpr, G: tl.constexpr, N: tl.constexpr, P: tl.constexpr,
             L: tl.constexpr, HPP: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr):
    """dq, dk over the state columns [BN block] and this block's share of dG, for chunk c, batch b, group grp
    and the HPP heads of split s of that group (dq, dk summed over those heads in registers).

    dG_t = q_t·dq_t - k_t·dk_t per head: row sums minus column sums of dscores * q k^T for the
    within-chunk part, q·(do h^T) and k·(v dh^T) for the state part. Every term splits over N.
    """
    c, pid_bg, pid = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    s, nb = pid // (N // BN), pid % (N // BN)
    b, grp = pid_bg // G, pid_bg % G
    offs_t = tl.arange(0, L)
    offs_n = nb * BN + tl.arange(0, BN)
    offs_p = tl.arange(0, P)
    row = b * T + c * L + offs_t
    qk_off = (row[:, None] * G + grp) * N + offs_n[None, :]
    q = tl.load(q_ptr + qk_off)
    k = tl.load(k_ptr + qk_off)
    qk = tl.dot(q, tl.trans(k), input_precision=PREC)  # this block's part of q k^T; shared by the heads
    causal = offs_t[:, None] >= offs_t[None, :]
    dq = tl.zeros((L, BN), dtype=tl.float32)
    dk = tl.zeros((L, BN), dtype=tl.float32)
    for j in range(HPP):
        h = grp * (H // G) + s * HPP + j
        g = tl.load(g_ptr + row * H + h)
        g_cum = tl.cumsum(g, 0)
        g_last = tl.sum(g, 0)
        to_end = tl.exp(g_last - g_cum)
        from_start = tl.exp(g_cum)
        vp_off = (row[:, None] * H + h) * P + offs_p[None, :]
        v = tl.load(v_ptr + vp_off)
        do = tl.load(do_ptr + vp_off)
        st_off = (((b * H + h) * NC + c) * N + offs_n[:, None]) * P + offs_p[None, :]
        state = tl.load(h_ptr + st_off).to(q.dtype)    # h_c (entering the chunk), these N columns
        dstate = tl.load(dh_ptr + st_off).to(q.dtype)  # dL/dh_{c+1}
        decay = tl.exp(tl.where(causal, g_cum[:, None] - g_cum[None, :], float("-inf")))
        dscores = tl.dot(do, tl.trans(v), input_precision=PREC) * decay
        dq_state = tl.dot(do, tl.trans(state), input_precision=PREC) * from_start[:, None]
        dk_state = tl.dot(v, tl.trans(dstate), input_precision=PREC) * to_end[:, None]
        ds = dscores.to(q.dtype)
        dq += tl.dot(ds, k, input_precision=PREC) + dq_state
        dk += tl.dot(tl.trans(ds), q, input_precision=PREC) + dk_state
        pair = dscores * qk
        dG = (tl.sum(pair, 1) - tl.sum(pair, 0)
              + tl.sum(q.to(tl.float32) * dq_state, 1) - tl.sum(k.to(tl.float32) * dk_state, 1))
        tl.store(dG_ptr + (nb * (BG // G) * H + b * H + h) * T + c * L + offs_t, dG)  # dG: [N/BN, B, H, T]
    # dq, dk: [splits, B, T, G, N] (in the input dtype when there is one split, else fp32, summed by torch)
    split_off = s * BG * T * N
    tl.store(dq_ptr + split_off + qk_off, dq.to(dq_ptr.dtype.element_ty))
    tl.store(dk_ptr + split_off + qk_off, dk.to(dk_ptr.dtype.element_ty))


def _pad_time(t: torch.Tensor, pad: int) -> torch.Tensor:
    if pad == 0:
        return t.contiguous()
    return F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)).contiguous()


def _precision(dtype: torch.dtype) -> str:
    """fp32 inputs multiply in full precision (the tests' oracle setting); bf16 on tensor cores."""
    return "ieee" if dtype == torch.float32 else "tf32"


def ssd_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(o [B, T, H, P], chunk-entering states [B, H, NC, N, P] fp32)."""
    bsz, seq_len, groups, n = q.shape
    heads, p = v.shape[2], v.shape[3]
    pad = -seq_len % CHUNK
    q, k, v, g = (_pad_time(t, pad) for t in (q, k, v, g))
    t_pad = seq_len + pad
    n_chunks = t_pad // CHUNK
    states = torch.empty(bsz, heads, n_chunks, n, p, device=v.device, dtype=torch.float32)
    out = torch.empty_like(v)
    bh, prec = bsz * heads, _precision(v.dtype)
    grid = lambda meta: (bh, n // meta["BN"], p // meta["BP"])  # noqa: E731
    _state_fwd[grid](k, v, g, states, t_pad, bh, n_chunks, H=heads, G=groups, N=n, P=p, L=CHUNK, PREC=prec)
    _output_fwd[(n_chunks, bh)](q, k, v, g, states, out, t_pad, bh, n_chunks, H=heads, G=groups, N=n, P=p, L=CHUNK,
                                PREC=prec)
    return (out[:, :seq_len].contiguous() if pad else out), states  # outputs match the op's fake: contiguous


def _heads_per_program(bsz: int, groups: int, n_chunks: int, heads_per_group: int, n_blocks: int) -> int:
    """Loop over as many of a group's heads per program as keeps >= ~4 programs per SM busy."""
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count \
        if torch.cuda.is_available() else 132  # (the Triton interpreter runs on CPU)
    target = 4 * sms
    hpp = heads_per_group
    while hpp > 1 and hpp % 2 == 0 and n_chunks * bsz * groups * n_blocks * (heads_per_group // hpp) < target:
        hpp //= 2
    return hpp


def ssd_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, states: torch.Tensor,
                 grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    bsz, seq_len, groups, n = q.shape
    heads, p = v.shape[2], v.shape[3]
    pad = -seq_len % CHUNK
    q, k, v, g, grad_out = (_pad_time(t, pad) for t in (q, k, v, g, grad_out))
    t_pad = seq_len + pad
    n_chunks = t_pad // CHUNK
    bh, bg, prec = bsz * heads, bsz * groups, _precision(v.dtype)
    dstates = torch.empty_like(states)
    grid = lambda meta: (bh, n // meta["BN"], p // meta["BP"])  # noqa: E731
    _state_bwd[grid](q, g, grad_out, dstates, t_pad, bh, n_chunks, H=heads, G=groups, N=n, P=p, L=CHUNK, PREC=prec)
    dv = torch.empty_like(v)
    _dv_bwd[(n_chunks, bh)](q, k, grad_out, g, dstates, dv, t_pad, bh, n_chunks, H=heads, G=groups, N=n, P=p,
                            L=CHUNK, PREC=prec)
    hpg = heads // groups
    block_n = min(n, 64)  # dq/dk/dG tiles over N: [64, 64] fp32 accumulators stay in registers
    n_blocks = n // block_n
    hpp = _heads_per_program(bsz, groups, n_chunks, hpg, n_blocks)
    splits = hpg // hpp
    dq = torch.empty(splits, bsz, t_pad, groups, n, device=q.device, dtype=q.dtype if splits == 1 else torch.float32)
    dk = torch.empty_like(dq)
    dG = torch.empty(n_blocks, bsz, heads, t_pad, device=q.device, dtype=torch.float32)
    _dqk_bwd[(n_chunks, bg, splits * n_blocks)](q, k, v, g, states, dstates, grad_out, dq, dk, dG, t_pad, bg,
                                                n_chunks, H=heads, G=groups, N=n, P=p, L=CHUNK, HPP=hpp,
                                                BN=block_n, PREC=prec)
    dq, dk = (t[0] if splits == 1 else t.sum(0).to(q.dtype) for t in (dq, dk))
    dG = dG[0] if n_blocks == 1 else dG.sum(0)
    # g_t enters every G_u with u >= t: a reverse cumulative sum, over the innermost dim (fast in torch)
    dg = dG.flip(-1).cumsum(-1).flip(-1).transpose(1, 2)
    return tuple(t[:, :seq_len].contiguous() for t in (dq, dk, dv, dg))
