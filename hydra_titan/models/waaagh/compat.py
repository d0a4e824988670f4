"""The seed's API: `OrkyHydraWaaaghModel(vocab_size, d_model, num_layers, num_heads, num_experts, max_seq_len)`.

`model(input_ids)` returns the logits [batch, seq, vocab]; `model.generate(input_ids, max_new_tokens,
temperature)` returns the prompt and the sampled tokens, decoding with the cache (DESIGN §3.11). It
wraps the registry's `waaagh` model, so everything the stack does with that model applies.
"""

from __future__ import annotations

import torch
from torch import nn

from .args import WaaaghModelArgs
from .model import WaaaghModel

# the seed's argument names -> the model args they set (errors are reported in the seed's names)
_SEED_NAMES = {"d_model": "dim", "num_layers": "n_layers", "num_heads": "n_heads", "num_experts": "moe_num_experts"}


class OrkyHydraWaaaghModel(nn.Module):
    def __init__(self, vocab_size: int = 50_000, d_model: int = 512, num_layers: int = 8, num_heads: int = 8,
                 num_experts: int = 8, max_seq_len: int = 2048, **kwargs):
        super().__init__()
        ssm_head = 32 if (2 * d_model) % 32 == 0 else 2 * d_model  # small widths still build
        fields = dict(vocab_size=vocab_size, dim=d_model, n_layers=num_layers, n_heads=num_heads,
                      moe_num_experts=num_experts, max_seq_len=max_seq_len, ssm_head_dim=ssm_head,
                      ssm_state_dim=32, window=min(128, max_seq_len))
        fields.update(kwargs)  # any other WaaaghModelArgs field (window, sparse_k, memory_slots, ...)
        try:
            args = WaaaghModelArgs(**fields)
        except ValueError as e:
            message = str(e)
            for seed, ours in _SEED_NAMES.items():
                message = message.replace(f"{ours} ", f"{seed} ").replace(f"{ours}=", f"{seed}=")
            message = message.replace("4 * n_heads", "4 * num_heads").replace("moe_num_experts", "num_experts")
            raise ValueError(message) from None
        self.model = WaaaghModel(args)
        self.model.init_weights()

    @property
    def args(self) -> WaaaghModelArgs:
        return self.model.args

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids)["logits"]

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 50, temperature: float = 0.8) -> torch.Tensor:
        """[batch, prompt + max_new_tokens]: the prompt, then sampled tokens (temperature 0: greedy)."""
        was_training = self.training
        self.eval()
        try:
            bsz, length = input_ids.shape
            cache = self.model.init_cache(bsz, length + max_new_tokens)
            logits = self.model(input_ids, cache=cache)["logits"][:, -1]
            out = [input_ids]
            for step in range(max_new_tokens):
                if temperature == 0:
                    token = logits.argmax(dim=-1, keepdim=True)
                else:
                    token = torch.multinomial((logits.float() / temperature).softmax(dim=-1), 1)
                out.append(token)
                if step + 1 < max_new_tokens:
                    logits = self.model(token, cache=cache)["logits"][:, -1]
            return torch.cat(out, dim=1)
        finally:
            self.train(was_training)
