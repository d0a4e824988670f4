"""Layers shared by every model family: norms, FFN, RoPE, attention backends, the pre-norm block."""

from .attention import ATTENTION_BACKENDS, get_attention_backend, sdpa_attention
from .block import PreNormBlock
from .ffn import SwiGLU, swiglu_hidden_dim
from .norms import RMSNorm, rms_normalize
from .rope import apply_rope, rope_cache

__all__ = [
    "ATTENTION_BACKENDS", "get_attention_backend", "sdpa_attention", "PreNormBlock", "SwiGLU",
    "swiglu_hidden_dim", "RMSNorm", "rms_normalize", "apply_rope", "rope_cache",
]
