"""The Mamba-2 (SSD) mixer shared by the SSM families (DESIGN §3.8).

    in_proj(x) -> z, (x, B, C), dt;  (x, B, C) <- SiLU(causal depthwise conv, kernel 4)
    h_t = exp(dt_t·A_h) h_{t-1} + dt_t·x_t B_t^T,   y_t = C_t^T h_t + D_h·x_t
    out = out_proj(RMSNorm(y · SiLU(z)))

dt = softplus(dt_raw + dt_bias), A = -exp(A_log): the per-head decay lies in (0, 1). The scan is
`hydra_titan.kernels.ssd` (PyTorch chunked form on CPU, our Triton kernels on CUDA). The conv is
written as K shifted multiply-adds: plain elementwise work that torch.compile fuses with the SiLU
and the splits around it (cuDNN's depthwise conv1d would be a separate launch in each direction).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...kernels.ssd import SSD_BACKENDS, resolve_ssd_backend, ssd_chunked_torch, ssd_with_state, triton_size_problem
from .cache import CacheView, extend_with_window
from .init import trunc_normal_
from .norms import RMSNorm


@dataclass(frozen=True)
class SSMConfig:
    """Sizes of one Mamba-2 mixer: heads = expand·dim / head_dim, each with state N."""

    head_dim: int = 64      # P
    state_dim: int = 128    # N
    groups: int = 1         # G: B and C are shared by heads/G heads each
    expand: int = 2
    conv_kernel: int = 4
    chunk_size: int = 64
    backend: str = "auto"
    dt_min: float = 1e-3
    dt_max: float = 1e-1

    def check(self, dim: int, prefix: str = "ssm_") -> None:
        """ValueErrors name the model argument (`ssm_<field>`) that is wrong."""
        for name in ("head_dim", "state_dim", "groups", "expand", "conv_kernel", "chunk_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{prefix}{name} must be positive, got {getattr(self, name)}")
        if self.backend not in SSD_BACKENDS:
            raise ValueError(f"{prefix}backend must be one of {SSD_BACKENDS}, got {self.backend!r}")
        inner = self.expand * dim
        if inner % self.head_dim:
            raise ValueError(f"{prefix}head_dim ({self.head_dim}) must divide {prefix}expand*dim ({inner})")
        if (inner // self.head_dim) % self.groups:
            raise ValueError(f"{prefix}groups ({self.groups}) must divide the number of SSM heads "
                             f"({inner // self.head_dim})")
        problem = triton_size_problem(self.head_dim, self.state_dim)
        if self.backend == "triton" and problem:  # explicit: unsupported sizes are a config error, not a fallback
            raise ValueError(problem)

    def n_heads(self, dim: int) -> int:
        return self.expand * dim // self.head_dim


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Depthwise causal conv over time: x [B, T, C], weight [C, K] -> [B, T, C].

    out_t = bias + sum_i weight[:, i] · x_{t-K+1+i} (zeros before the start).
    """
    kernel, seq_len = weight.shape[1], x.shape[1]
    padded = F.pad(x, (0, 0, kernel - 1, 0))
    out = bias + padded[:, kernel - 1:] * weight[:, kernel - 1]
    for i in range(kernel - 1):
        out = out + padded[:, i:i + seq_len] * weight[:, i]
    return out


class Mamba2Mixer(nn.Module):
    """Token mixer with the attention signature `(x, positions, rope_cache)`; positions are unused."""

    def __init__(self, dim: int, cfg: SSMConfig, norm_eps: float = 1e-5):
        super().__init__()
        cfg.check(dim)
        self.cfg = cfg
        self.inner = cfg.expand * dim
        self.n_heads = cfg.n_heads(dim)
        self.bc_dim = cfg.groups * cfg.state_dim
        self.conv_dim = self.inner + 2 * self.bc_dim
        self.in_proj = nn.Linear(dim, 2 * self.inner + 2 * self.bc_dim + self.n_heads, bias=False)
        self.conv_weight = nn.Parameter(torch.empty(self.conv_dim, cfg.conv_kernel))
        self.conv_bias = nn.Parameter(torch.empty(self.conv_dim))
        self.dt_bias = nn.Parameter(torch.empty(self.n_heads))
        self.A_log = nn.Parameter(torch.empty(self.n_heads))
        self.D = nn.Parameter(torch.empty(self.n_heads))
        self.norm = RMSNorm(self.inner, norm_eps)
        self.out_proj = nn.Linear(self.inner, dim, bias=False)
        self.backend, self._scan = resolve_ssd_backend(
            cfg.backend, head_dim=cfg.head_dim, state_dim=cfg.state_dim, chunk_size=cfg.chunk_size,
            device_type="cuda" if torch.cuda.is_available() else "cpu")
        self._torch_scan = functools.partial(ssd_chunked_torch, chunk_size=cfg.chunk_size)  # CPU inputs

    def scan_inputs(self, x: torch.Tensor, cache: CacheView | None = None) -> tuple[torch.Tensor, ...]:
        """(q = C, k = B, v = x·dt, g = dt·A, x, z) of the scan for a normalised input [B, T, dim]."""
        bsz, seq_len, _ = x.shape
        z, xbc, dt = self.in_proj(x).split([self.inner, self.conv_dim, self.n_heads], dim=-1)
        if cache is None:
            xbc = causal_conv1d(xbc, self.conv_weight, self.conv_bias)
        else:  # decode: the conv continues from the last K-1 inputs of each row
            ext = extend_with_window(cache, "conv_window", xbc, self.cfg.conv_kernel - 1)
            xbc = causal_conv1d(ext, self.conv_weight, self.conv_bias)[:, -seq_len:]
        xbc = F.silu(xbc)
        xs, b, c = xbc.split([self.inner, self.bc_dim, self.bc_dim], dim=-1)
        dt = F.softplus(dt.float() + self.dt_bias.float())  # [B, T, H] fp32
        a = -torch.exp(self.A_log.float())
        xs = xs.view(bsz, seq_len, self.n_heads, self.cfg.head_dim)
        v = (xs * dt.unsqueeze(-1)).to(xs.dtype)
        groups = (bsz, seq_len, self.cfg.groups, self.cfg.state_dim)
        return c.reshape(groups), b.reshape(groups), v, dt * a, xs, z

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None,
                rope_cache: torch.Tensor | None = None, cache: CacheView | None = None) -> torch.Tensor:
        """`cache` (decode): the conv window and the fp32 state [B, H, N, P] of each row."""
        del positions, rope_cache
        q, k, v, g, xs, z = self.scan_inputs(x, cache)
        if cache is None:
            scan = self._scan if x.device.type == "cuda" else self._torch_scan
            y = scan(q, k, v, g)
        else:  # a padding token adds nothing and decays nothing: the state skips it
            valid = cache.valid
            v, g = v * valid[..., None, None].to(v.dtype), g * valid[..., None]
            state = cache.get("state", lambda: x.new_zeros((x.shape[0], self.n_heads, self.cfg.state_dim,
                                                            self.cfg.head_dim), dtype=torch.float32))
            y, new_state = ssd_with_state(q, k, v, g, state, self.cfg.chunk_size)
            state.copy_(new_state)  # in place: a captured decode step replays into the same tensor
        y = y + xs * self.D.to(xs.dtype).unsqueeze(-1)
        y = y.flatten(2) * F.silu(z)
        return self.out_proj(self.norm(y))

    @torch.no_grad()
    def init_weights(self, init_std: float, out_std: float) -> None:
        """Mamba-2's initialisation: dt log-uniform in [dt_min, dt_max], A in [1, 16], D = 1."""
        trunc_normal_(self.in_proj.weight, init_std)
        trunc_normal_(self.out_proj.weight, out_std)
        bound = 1.0 / math.sqrt(self.cfg.conv_kernel)
        nn.init.uniform_(self.conv_weight, -bound, bound)
        nn.init.uniform_(self.conv_bias, -bound, bound)
        lo, hi = math.log(self.cfg.dt_min), math.log(self.cfg.dt_max)
        dt = torch.exp(torch.rand_like(self.dt_bias) * (hi - lo) + lo).clamp(min=1e-4)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        self.A_log.copy_(torch.log(torch.empty_like(self.A_log).uniform_(1.0, 16.0)))
        nn.init.ones_(self.D)
        self.norm.reset_parameters()


# FLOPs (DESIGN §4): weights cost 6 per token; the SSD scan counts the chunked form the kernels run,
# per head and token (forward; backward twice that): the intra-chunk q·k^T and scores·v over the L
# tokens of the chunk, 2L(N + P), and the chunk state k^T v plus the state read q h, 4NP.
def ssm_weight_params(dim: int, cfg: SSMConfig) -> int:
    """in_proj and out_proj of one mixer (the per-head vectors and norm gain are not matmuls)."""
    inner, heads, bc = cfg.expand * dim, cfg.n_heads(dim), cfg.groups * cfg.state_dim
    return dim * (2 * inner + 2 * bc + heads) + inner * dim


def ssm_flops_per_token(dim: int, cfg: SSMConfig) -> float:
    inner, heads = cfg.expand * dim, cfg.n_heads(dim)
    conv_dim = inner + 2 * cfg.groups * cfg.state_dim
    scan_fwd = heads * (2 * cfg.chunk_size * (cfg.state_dim + cfg.head_dim) + 4 * cfg.state_dim * cfg.head_dim)
    return 6 * ssm_weight_params(dim, cfg) + 6 * conv_dim * cfg.conv_kernel + 3 * scan_fwd
