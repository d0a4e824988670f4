"""Layers shared by every model family: norms, FFN, RoPE, attention backends."""

from .attention import ATTENTION_BACKENDS, get_attention_backend, sdpa_attention
from .ffn import SwiGLU, swiglu_hidden_dim
from .norms import RMSNorm, rms_normalize
from .rope import apply_rope, rope_cache

__all__ = [
    "ATTENTION_BACKENDS", "get_attention_backend", "sdpa_attention", "SwiGLU",
    "swiglu_hidden_dim", "RMSNorm", "rms_normalize", "apply_rope", "rope_cache",
]
