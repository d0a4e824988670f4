"""Arguments and flavors of the Waaagh family (seed 003, DESIGN §3.10).

Each block: x += SSM(norm(x)); x += W_o · [local | sparse | memory | prediction](norm(x));
x += MoE(norm(x)). The four specialist heads each own a quarter of the width, split into
`n_heads` attention heads (so dim must be divisible by 4 · n_heads).

`ablate` names components to remove from every block, for the seed's component comparison
(scripts/waaagh_demo.py): any of ABLATABLE, as a tuple, a list (TOML) or a comma-separated string
(`--model.overrides.ablate memory,moe`). What each removal means is in `WaaaghBlock`'s docstring.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from ..common.args import check_positive, replace_args
from ..common.ffn import swiglu_hidden_dim
from ..common.moe import MoEArgs
from ..common.ssm import SSMConfig

N_SPECIALISTS = 4  # local, sparse global, memory, prediction
HEAD_NAMES = ("local", "sparse", "memory", "prediction")  # their order in W_o's input
ABLATABLE = ("ssm", *HEAD_NAMES, "moe")


def parse_ablate(value: str | Iterable[str]) -> tuple[str, ...]:
    """The components `value` names, checked, without repeats, in ABLATABLE's order."""
    if isinstance(value, str):
        names = [part.strip() for part in value.split(",") if part.strip()]
    elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        names = [v.strip() for v in value]
    else:
        raise ValueError(f"ablate must be a list of component names (or one comma-separated string) from "
                         f"{ABLATABLE}, got {value!r}")
    unknown = [name for name in names if name not in ABLATABLE]
    if unknown:
        raise ValueError(f"ablate: unknown component(s) {unknown}; allowed: {ABLATABLE}")
    return tuple(name for name in ABLATABLE if name in names)


@dataclass
class WaaaghModelArgs(MoEArgs):
    vocab_size: int = 100_352
    dim: int = 512
    n_layers: int = 4
    n_heads: int = 4              # attention heads inside each specialist (its quarter of the width)
    window: int = 128             # local head: causal sliding window
    sparse_k: int = 32            # sparse head: past keys each query keeps
    sparse_query_chunk: int = 256  # sparse head: queries scored at once (bounds the [chunk, T] score tile)
    memory_slots: int = 64        # memory head: learned key/value bank
    predict_aux_weight: float = 0.01
    ffn_dim_multiplier: float = 1.0
    multiple_of: int = 256
    norm_eps: float = 1e-5
    rope_theta: float = 10_000.0
    max_seq_len: int = 4096
    moe_num_experts: int = 4      # DESIGN §3.10: a mixture of 4 experts, top-1
    ssm_head_dim: int = 64
    ssm_state_dim: int = 128
    ssm_groups: int = 1
    ssm_expand: int = 2
    ssm_conv_kernel: int = 4
    ssm_chunk_size: int = 64
    ssm_backend: str = "auto"
    ablate: tuple[str, ...] = ()  # components removed from every block, from ABLATABLE

    def __post_init__(self) -> None:
        check_positive(self, ("vocab_size", "dim", "n_layers", "n_heads", "window", "sparse_k",
                              "sparse_query_chunk", "memory_slots", "max_seq_len"))
        if self.dim % (N_SPECIALISTS * self.n_heads):
            raise ValueError(f"dim ({self.dim}) must be divisible by 4 * n_heads ({N_SPECIALISTS} * {self.n_heads}): "
                             "each of the four specialist heads takes a quarter of the width, split into n_heads")
        if self.head_dim % 2:
            raise ValueError(f"dim / (4 * n_heads) = {self.head_dim} must be even (RoPE rotates pairs)")
        if self.predict_aux_weight < 0:
            raise ValueError(f"predict_aux_weight must be >= 0, got {self.predict_aux_weight}")
        if self.moe_num_experts < 1:
            raise ValueError(f"moe_num_experts must be >= 1 (every Waaagh block has an MoE), got {self.moe_num_experts}")
        self.validate_moe(self.dim, self.ffn_hidden_dim, self.n_layers)
        self.ssm_config.check(self.dim)
        self.ablate = parse_ablate(self.ablate)

    def has(self, component: str) -> bool:
        """Whether blocks build `component` (one of ABLATABLE), i.e. it is not ablated."""
        if component not in ABLATABLE:
            raise ValueError(f"unknown component {component!r}; allowed: {ABLATABLE}")
        return component not in self.ablate

    def ffn_layout(self, layer_id: int) -> tuple[bool, int]:
        """(routed, hidden size of the dense SwiGLU) of layer `layer_id`'s FFN. Ablating "moe" keeps the
        FFN but not the routing: a dense SwiGLU as wide as one expert."""
        if not self.is_moe_layer(layer_id, self.n_layers):
            return False, self.ffn_hidden_dim
        if self.has("moe"):
            return True, self.ffn_hidden_dim
        return False, self.moe_expert_hidden(self.ffn_hidden_dim)

    @property
    def head_width(self) -> int:
        """Channels of one specialist."""
        return self.dim // N_SPECIALISTS

    @property
    def head_dim(self) -> int:
        return self.head_width // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        return swiglu_hidden_dim(self.dim, self.ffn_dim_multiplier, self.multiple_of)

    @property
    def ssm_config(self) -> SSMConfig:
        return SSMConfig(head_dim=self.ssm_head_dim, state_dim=self.ssm_state_dim, groups=self.ssm_groups,
                         expand=self.ssm_expand, conv_kernel=self.ssm_conv_kernel, chunk_size=self.ssm_chunk_size,
                         backend=self.ssm_backend)

    def replace(self, **overrides: Any) -> "WaaaghModelArgs":
        return replace_args(self, overrides)


# Named by the parameters a token passes through (one expert of four, LM head in): 100M has 201M in
# all, 350M 754M (scripts/model_table.py).
WAAAGH_FLAVORS: dict[str, WaaaghModelArgs] = {
    "debug": WaaaghModelArgs(vocab_size=4096, dim=256, n_layers=4, n_heads=2, window=32, sparse_k=16,
                             memory_slots=32, max_seq_len=1024, ssm_head_dim=32, ssm_state_dim=32),
    "100M": WaaaghModelArgs(dim=512, n_layers=8, n_heads=4),
    "350M": WaaaghModelArgs(dim=1024, n_layers=12, n_heads=4),
}
