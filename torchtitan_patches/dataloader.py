"""hydra_titan's packed-window dataloader behind torchtitan's dataloader interface.

torchtitan's text loaders stream Hugging Face datasets (a download at run
time). This one serves hydra_titan's sources (the built-in KJV demo corpus,
local text or jsonl, pre-tokenized shards, or ``hf``) through hydra_titan's
own loader, so a torchtitan run reads the same windows, in the same order, as
a hydra_titan run with the same seed, sequence length, batch and
``val_fraction`` (which decides how many windows the train split has, and so
the shuffle). Batches come as torchtitan expects them: ``({"input": ids},
labels)``. The state saved in checkpoints is the loader's position (two ints,
the same on every rank).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torchtitan.components.dataloader import BaseDataLoader

from hydra_titan.components.dataloader import DATA_SOURCES, load_windows, split_loader

from .tokenizer import HydraTokenizer


class HydraDataLoader(BaseDataLoader):
    @dataclass(kw_only=True, slots=True)
    class Config(BaseDataLoader.Config):
        dataset: str = "demo"
        """hydra_titan data source: demo (built-in KJV) | text | shards | hf"""

        dataset_path: str | None = None
        """file, folder or glob of the data (text / shards)"""

        text_field: str = "text"
        """field holding the document text (jsonl / hf)"""

        hf_name: str = ""
        """Hugging Face dataset name (dataset = hf)"""

        hf_split: str = "train"
        """Hugging Face dataset split (dataset = hf)"""

        val_fraction: float = 0.01
        """tail of the windows held out (not trained on); it sets the train split, hence the order"""

        seed: int = 42
        """shuffle seed (hydra_titan's job.seed)"""

        def __post_init__(self) -> None:
            if self.dataset not in DATA_SOURCES:
                raise ValueError(f"dataloader.dataset must be one of {DATA_SOURCES}, got {self.dataset!r}")

    def __init__(self, config: Config, *, dp_world_size: int, dp_rank: int, tokenizer: HydraTokenizer,
                 seq_len: int, local_batch_size: int, snapshot_every_n_steps: int | None = None) -> None:
        """The keyword arguments are those torchtitan's trainer passes; ``snapshot_every_n_steps`` is
        unused (the position is two ints, saved whenever a checkpoint is)."""
        del snapshot_every_n_steps
        if not isinstance(tokenizer, HydraTokenizer):
            raise TypeError(f"HydraDataLoader needs the tokenizer config HydraTokenizer.Config, got "
                            f"{type(tokenizer).__name__}")
        windows = load_windows(source=config.dataset, path=config.dataset_path or "", tokenizer=tokenizer.tokenizer,
                               seq_len=seq_len, text_field=config.text_field, hf_name=config.hf_name,
                               hf_split=config.hf_split)
        self.loader = split_loader(windows, split="train", val_fraction=config.val_fraction,
                                   local_batch_size=local_batch_size, dp_rank=dp_rank, dp_world_size=dp_world_size,
                                   seed=config.seed)

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        for inputs, labels in self.loader:
            yield {"input": inputs}, labels

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:  # a model-only checkpoint has none: start from the beginning
            self.loader.load_state_dict(state_dict)
