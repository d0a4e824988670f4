"""The SSD scan of Mamba-2 (DESIGN §3.8): a PyTorch reference and the Triton op, behind one switch.

Every backend computes the same causal scan, written in its gated-linear-attention form

    o_t = sum_{s <= t} exp(G_t - G_s) (q_t · k_s) v_s,      G_t = g_1 + ... + g_t

for q = C, k = B ([batch, T, groups, N]: each group serves heads/groups heads), v = x·dt
([batch, T, heads, P]) and g = dt·A ([batch, T, heads], fp32, <= 0). That is exactly the SSD
recurrence h_t = exp(g_t) h_{t-1} + k_t^T v_t, o_t = q_t h_t with a zero initial state.

* `torch`: the chunked (segment-sum) form in plain PyTorch: the CPU path, the oracle of every
  kernel test, and autograd's backward. Checked against `ssd_sequential` in float64.
* `triton`: our chunked forward and backward (`ssd_triton.py`), registered as the custom op
  `hydra_titan::ssd_scan` with a fake implementation, so a compiled block keeps one graph.
  Ours because fla-core's gated backward refuses to run on the GPU hosts' Triton 3.6.
* `fla`: fla-core's `chunk_simple_gla` where it is installed and its checks allow (its ops are
  `torch.compiler.disable`, so a compiled block breaks around it; forward-only on triton < 3.7.1).
* `auto`: `triton` on CUDA when Triton imports and the sizes are supported, else `torch`.
"""

from __future__ import annotations

import functools
import importlib
import logging
from typing import Callable

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

SSD_BACKENDS = ("auto", "triton", "torch", "fla")
TRITON_CHUNK = 64
TRITON_SIZES = (64, 128)  # head dim P and state N the Triton kernels are built and tested for


def ssd_sequential(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The recurrence itself, one token at a time (slow; tests only)."""
    bsz, seq_len, groups, n = q.shape
    heads, p = v.shape[2], v.shape[3]
    q, k = (t.repeat_interleave(heads // groups, dim=2) for t in (q, k))
    h = v.new_zeros(bsz, heads, n, p)
    out = []
    for t in range(seq_len):
        h = h * g[:, t].exp()[..., None, None] + k[:, t, :, :, None] * v[:, t, :, None, :]
        out.append(torch.einsum("bhn,bhnp->bhp", q[:, t], h))
    return torch.stack(out, dim=1)


def _segsum(x: torch.Tensor) -> torch.Tensor:
    """[..., L] -> [..., L, L]: sum of x[j+1..i] below the diagonal, -inf above (exp gives the decay mask)."""
    length = x.shape[-1]
    cs = x.cumsum(-1)
    diff = cs[..., :, None] - cs[..., None, :]
    causal = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
    return diff.masked_fill(~causal, float("-inf"))


def ssd_chunked_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                      chunk_size: int = 64) -> torch.Tensor:
    """The chunked SSD in PyTorch (Mamba-2 paper's listing): intra-chunk attention + passed states.

    Computed in fp32 (fp64 stays fp64); T need not be a multiple of the chunk (zero padding at the
    end cannot reach earlier tokens). Returns v's dtype.
    """
    bsz, seq_len, groups, _ = q.shape
    heads, out_dtype = v.shape[2], v.dtype
    compute = torch.float64 if v.dtype == torch.float64 else torch.float32
    pad = -seq_len % chunk_size
    q, k, v, g = (F.pad(t.to(compute), (0, 0) * (t.dim() - 2) + (0, pad)) for t in (q, k, v, g))
    n_chunks = q.shape[1] // chunk_size
    rep = heads // groups
    # [B, T, X, D] -> [B, X, c, L, D]
    q, k, v = (t.unflatten(1, (n_chunks, chunk_size)).permute(0, 3, 1, 2, 4) for t in (q, k, v))
    q, k = q.repeat_interleave(rep, dim=1), k.repeat_interleave(rep, dim=1)
    g = g.unflatten(1, (n_chunks, chunk_size)).permute(0, 3, 1, 2)  # [B, H, c, L]
    g_cum = g.cumsum(-1)
    # 1. within each chunk: masked, decayed attention
    decay = _segsum(g).exp()
    y = (q @ k.transpose(-1, -2) * decay) @ v
    # 2. the state each chunk leaves (from its own tokens), 3. passed along the chunks
    to_end = (g_cum[..., -1:] - g_cum).exp()
    states = (k * to_end[..., None]).transpose(-1, -2) @ v  # [B, H, c, N, P]
    # with a zero state in front, slot c+1 holds what chunk c leaves; the state entering chunk z is
    # the sum over slots c' <= z, decayed by the totals of chunks c' .. z-1
    states = F.pad(states, (0, 0, 0, 0, 1, 0))
    chunk_decay = _segsum(F.pad(g_cum[..., -1], (1, 0))).exp()  # [B, H, c+1, c+1]
    entering = torch.einsum("bhzc,bhcnp->bhznp", chunk_decay, states)[:, :, :-1]
    # 4. what each chunk's tokens read from the state that entered it
    y = y + (q * g_cum.exp()[..., None]) @ entering
    return y.permute(0, 2, 3, 1, 4).flatten(1, 2)[:, :seq_len].to(out_dtype)


def ssd_with_state(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, state: torch.Tensor,
                   chunk_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """The scan continued from `state` h_0 [B, H, N, P]: (outputs, the state after the last token).

    For decoding (eager, fp32). With G_t the running sum of g from this call's first token,
    o_t = (zero-state scan)_t + exp(G_t) q_t h_0 and h_T = exp(G_T) h_0 + sum_t exp(G_T - G_t) k_t^T v_t.
    """
    heads, groups = v.shape[2], q.shape[2]
    qh, kh = (t.float().repeat_interleave(heads // groups, dim=2) for t in (q, k))
    vf, g_cum = v.float(), g.float().cumsum(dim=1)                      # g_cum [B, T, H]
    from_state = torch.einsum("bthn,bhnp->bthp", qh, state) * g_cum.exp()[..., None]
    scan = (ssd_sequential(q.float(), k.float(), vf, g.float()) if q.shape[1] == 1
            else ssd_chunked_torch(q.float(), k.float(), vf, g.float(), chunk_size))
    to_end = (g_cum[:, -1:] - g_cum).exp()
    new_state = (state * g_cum[:, -1].exp()[..., None, None]
                 + torch.einsum("bth,bthn,bthp->bhnp", to_end, kh, vf))
    return (scan + from_state).to(v.dtype), new_state


# ------------------------------------------------------------------ the Triton custom op

def triton_available() -> bool:
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return torch.cuda.is_available()


def triton_size_problem(head_dim: int, state_dim: int) -> str | None:
    """Why the Triton kernels cannot take these sizes (None: they can)."""
    for name, value in (("ssm_head_dim", head_dim), ("ssm_state_dim", state_dim)):
        if value not in TRITON_SIZES:
            return f"{name}={value} is not supported by the Triton SSD kernels (supported: {TRITON_SIZES})"
    return None


@functools.cache
def _triton_impl():
    from . import ssd_triton  # imports triton: only on a machine that has it
    return ssd_triton


@torch.library.custom_op("hydra_titan::ssd_scan_fwd", mutates_args=())
def _ssd_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _triton_impl().ssd_forward(q, k, v, g)


@_ssd_fwd.register_fake
def _(q, k, v, g):
    bsz, seq_len, heads, p = v.shape
    n_chunks = -(-seq_len // TRITON_CHUNK)
    return v.new_empty(v.shape), v.new_empty((bsz, heads, n_chunks, q.shape[-1], p), dtype=torch.float32)


@torch.library.custom_op("hydra_titan::ssd_scan_bwd", mutates_args=())
def _ssd_bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, states: torch.Tensor,
             grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _triton_impl().ssd_backward(q, k, v, g, states, grad_out)


@_ssd_bwd.register_fake
def _(q, k, v, g, states, grad_out):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), g.new_empty(g.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, g = inputs
    ctx.set_materialize_grads(False)  # no zero-filled gradient for the (never used) chunk states
    ctx.save_for_backward(q, k, v, g, output[1])


def _backward(ctx, grad_out, grad_states):
    del grad_states  # the chunk states are an internal output: nothing downstream differentiates them
    q, k, v, g, states = ctx.saved_tensors
    if grad_out is None:  # the output was not used
        return None, None, None, None
    return _ssd_bwd(q, k, v, g, states, grad_out.contiguous())


_ssd_fwd.register_autograd(_backward, setup_context=_setup_context)


def ssd_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The Triton scan (chunk 64), differentiable, one node in a compiled graph."""
    return _ssd_fwd(q.contiguous(), k.contiguous(), v.contiguous(), g.float().contiguous())[0]


def ssd_scan_op():
    """The forward op overload (what a selective-AC policy sees)."""
    return torch.ops.hydra_titan.ssd_scan_fwd.default


def _ssd_fla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    try:
        from fla.ops.simple_gla import chunk_simple_gla
    except ImportError as e:
        raise ImportError(f"ssm_backend='fla' needs fla-core (pip install fla-core packaging): {e}") from e
    rep = v.shape[2] // q.shape[2]
    q, k = (t.repeat_interleave(rep, dim=2) for t in (q, k))
    out, _ = chunk_simple_gla(q, k, v, g.float(), scale=1.0)
    return out


ScanFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def resolve_ssd_backend(name: str, *, head_dim: int, state_dim: int, chunk_size: int,
                        device_type: str = "cuda") -> tuple[str, ScanFn]:
    """(chosen backend name, scan function). `auto` falls back to `torch` with a logged reason."""
    if name not in SSD_BACKENDS:
        raise ValueError(f"unknown ssm_backend {name!r}; known: {SSD_BACKENDS}")
    torch_scan = functools.partial(ssd_chunked_torch, chunk_size=chunk_size)
    if name == "torch":
        return "torch", torch_scan
    if name == "fla":
        return "fla", _ssd_fla
    problem = triton_size_problem(head_dim, state_dim)
    if name == "triton":
        if problem:
            raise ValueError(problem)
        return "triton", ssd_triton
    if device_type == "cuda" and triton_available() and problem is None:
        return "triton", ssd_triton
    reason = problem or ("no CUDA device" if device_type != "cuda" or not torch.cuda.is_available()
                         else "Triton is not importable")
    logger.info("ssm_backend=auto: using the PyTorch chunked SSD (%s)", reason)
    return "torch", torch_scan
