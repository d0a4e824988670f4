"""Stateful, data-parallel, packed-window dataloader.

Every source becomes memmapped token shards (see ``datasets.py``). The token
stream is cut into *windows* of ``seq_len + 1`` tokens with stride ``seq_len``
(every token after the first is a label exactly once). Windows are numbered
globally; the last ``ceil(val_fraction * n)`` are the validation split, the
rest are training windows.

Order: at step ``s`` of an epoch, the global batch is positions
``[s*G, (s+1)*G)`` with ``G = dp_world_size * local_batch_size``; rank ``r``
takes the ``r``-th slice of ``local_batch_size``. A position maps to a window
through a seeded bijection (seed + epoch) for training, identity for
validation. So the state is two ints, identical on every rank, and it stays
valid when the DP degree changes at a fixed global batch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from hydra_titan.components.datasets import TokenShard, cached_token_shard, open_token_shards
from hydra_titan.components.tokenizer import Tokenizer, build_tokenizer

logger = logging.getLogger(__name__)

__all__ = ["DATA_SOURCES", "FILE_SOURCES", "IndexPermutation", "PackedWindows", "TokenDataLoader", "build_dataloader",
           "heldout_loader", "load_windows", "split_loader"]

DATA_SOURCES = ("demo", "text", "shards", "hf")
# the sources that read `path` (the others name a corpus, not files), and what their path may be
PATH_FORMS = {"text": "a .txt/.jsonl file, a folder or a glob", "shards": "a .bin file, a folder of them, or a glob"}
FILE_SOURCES = tuple(PATH_FORMS)
SPLITS = ("train", "val")
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


class PackedWindows:
    """Random access to windows of ``seq_len + 1`` tokens over a list of shards.

    Windows never straddle two shard files (at most ``seq_len`` tokens per file
    are left unused), so a window is one contiguous memmap slice.
    """

    def __init__(self, shards: list[TokenShard], seq_len: int) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.shards = shards
        self.seq_len = seq_len
        counts = [max(0, (s.num_tokens - 1) // seq_len) for s in shards]
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.num_tokens = sum(s.num_tokens for s in shards)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def get(self, indices: np.ndarray) -> np.ndarray:
        """Windows ``indices`` as an int64 array ``[len(indices), seq_len + 1]``."""
        out = np.empty((len(indices), self.seq_len + 1), dtype=np.int64)
        shard_ids = np.searchsorted(self._starts, indices, side="right") - 1
        for row, (idx, sid) in enumerate(zip(indices.tolist(), shard_ids.tolist())):
            begin = (idx - int(self._starts[sid])) * self.seq_len
            out[row] = self.shards[sid].tokens[begin : begin + self.seq_len + 1]
        return out


class IndexPermutation:
    """A seeded pseudo-random bijection of ``[0, n)`` in O(1) memory.

    A 4-round Feistel network over the smallest even-bit power-of-two domain
    that covers ``n``, with cycle walking back into range. Unlike
    ``np.random.permutation`` it never materialises ``n`` indices, so a
    billion-window epoch costs nothing to shuffle or to resume into.
    """

    _ROUNDS = 4

    def __init__(self, n: int, seed: int) -> None:
        if n < 1:
            raise ValueError(f"cannot permute an empty range (n={n})")
        self.n = n
        bits = max(2, (n - 1).bit_length())
        self._half = (bits + 1) // 2
        self._mask = np.uint64((1 << self._half) - 1)
        self._keys = np.random.SeedSequence(seed).generate_state(self._ROUNDS, dtype=np.uint64)

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        x = np.asarray(positions, dtype=np.uint64)
        if x.size and (x.max() >= self.n):
            raise IndexError(f"positions must be < {self.n}")
        out = self._encrypt(x)
        outside = out >= self.n
        while outside.any():
            out[outside] = self._encrypt(out[outside])
            outside = out >= self.n
        return out.astype(np.int64)

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        half = np.uint64(self._half)
        left, right = x >> half, x & self._mask
        for key in self._keys:
            left, right = right, left ^ (self._mix(right ^ key) & self._mask)
        return (left << half) | right

    @staticmethod
    def _mix(z: np.ndarray) -> np.ndarray:
        """splitmix64 finaliser: a cheap, well-mixed round function."""
        with np.errstate(over="ignore"):
            z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9) & _MASK64
            z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB) & _MASK64
            return z ^ (z >> np.uint64(31))


class TokenDataLoader:
    """Yields ``(inputs, labels)`` int64 tensors ``[local_batch_size, seq_len]``.

    ``train``: infinite, reshuffled every epoch with ``seed + epoch``; each
    epoch runs ``num_windows // G`` full global batches so all ranks take the
    same number of steps; the position advances as batches are taken. ``val``:
    every ``iter()`` is one pass in order from the start (no position to save).
    """

    def __init__(
        self,
        windows: PackedWindows,
        *,
        first_window: int,
        num_windows: int,
        local_batch_size: int,
        dp_rank: int,
        dp_world_size: int,
        seed: int,
        train: bool,
    ) -> None:
        if local_batch_size < 1:
            raise ValueError(f"local_batch_size must be >= 1, got {local_batch_size}")
        if dp_world_size < 1 or not 0 <= dp_rank < dp_world_size:
            raise ValueError(f"need 0 <= dp_rank < dp_world_size, got dp_rank={dp_rank}, dp_world_size={dp_world_size}")
        self.windows = windows
        self.first_window = first_window
        self.num_windows = num_windows
        self.local_batch_size = local_batch_size
        self.dp_rank = dp_rank
        self.dp_world_size = dp_world_size
        self.global_batch_size = local_batch_size * dp_world_size
        self.seed = seed
        self.train = train
        self.steps_per_epoch = num_windows // self.global_batch_size
        self._epoch = 0
        self._step = 0
        self._perm: IndexPermutation | None = None
        self._perm_epoch = -1
        if self.steps_per_epoch == 0:
            message = (
                f"the {'train' if train else 'val'} split has {num_windows} windows of seq_len+1="
                f"{windows.seq_len + 1} tokens, fewer than one global batch "
                f"({dp_world_size} ranks x {local_batch_size} = {self.global_batch_size})"
            )
            if train:
                raise ValueError(message + "; use more data, a shorter seq_len or a smaller batch")
            logger.warning("%s: validation yields no batches", message)
        elif num_windows % self.global_batch_size:
            logger.info(
                "%s split: %d of %d windows per epoch are left out to keep full global batches",
                "train" if train else "val",
                num_windows % self.global_batch_size,
                num_windows,
            )

    def __len__(self) -> int:
        """Batches per epoch (per pass, for validation)."""
        return self.steps_per_epoch

    def window_indices(self, epoch: int, step: int) -> np.ndarray:
        """Global window ids this rank reads at (epoch, step); the schedule, without I/O."""
        base = step * self.global_batch_size + self.dp_rank * self.local_batch_size
        positions = np.arange(base, base + self.local_batch_size, dtype=np.int64)
        if self.train:
            if self._perm is None or self._perm_epoch != epoch:
                self._perm = IndexPermutation(self.num_windows, self.seed + epoch)
                self._perm_epoch = epoch
            positions = self._perm(positions)
        return self.first_window + positions

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if not self.train:  # every evaluation is the same pass, from the start
            for step in range(self.steps_per_epoch):
                yield self._batch(0, step)
            return
        while self.steps_per_epoch:
            if self._step >= self.steps_per_epoch:
                self._epoch, self._step = self._epoch + 1, 0
            epoch, step = self._epoch, self._step
            self._step += 1  # advance before yielding: a checkpoint taken now resumes at the next batch
            yield self._batch(epoch, step)

    def _batch(self, epoch: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.from_numpy(self.windows.get(self.window_indices(epoch, step)))
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def state_dict(self) -> dict[str, int]:
        """Position (same on every rank) plus what it is only valid for."""
        return {
            "epoch": self._epoch,
            "samples_in_epoch": self._step * self.global_batch_size,
            "num_windows": self.num_windows,
            "seq_len": self.windows.seq_len,
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at exactly the next batch; refuses state from a different dataset or schedule."""
        for key in ("num_windows", "seq_len", "seed"):
            mine = self.state_dict()[key]
            if int(state[key]) != mine:
                raise ValueError(
                    f"dataloader state is for {key}={int(state[key])}, this loader has {key}={mine}: "
                    "the data, seq_len, val_fraction or seed changed since the checkpoint"
                )
        samples = int(state["samples_in_epoch"])
        if samples % self.global_batch_size:
            raise ValueError(
                f"dataloader state is {samples} samples into the epoch, not a multiple of the "
                f"global batch {self.global_batch_size}: resume with the same global batch size"
            )
        self._epoch = int(state["epoch"])
        self._step = samples // self.global_batch_size


def _split_range(total: int, split: str, val_fraction: float) -> tuple[int, int]:
    """(first window, count) of a split: validation is the tail ``ceil(val_fraction * total)``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    num_val = math.ceil(total * val_fraction) if val_fraction > 0 else 0
    if split == "val":
        if num_val == 0:
            raise ValueError("split 'val' needs val_fraction > 0")
        return total - num_val, num_val
    return 0, total - num_val


def _load_shards(
    source: str,
    path: str,
    tokenizer: Tokenizer,
    *,
    text_field: str,
    hf_name: str,
    hf_split: str,
    cache_dir: str | Path | None,
) -> list[TokenShard]:
    if source in FILE_SOURCES and not path:
        raise ValueError(f"data source {source!r} needs a path ({PATH_FORMS[source]})")
    if source == "shards":
        return open_token_shards(path, tokenizer)
    if source not in DATA_SOURCES:
        raise ValueError(f"unknown data source {source!r}; choose one of {DATA_SOURCES}")
    return [
        cached_token_shard(
            source,
            tokenizer,
            path=path,
            text_field=text_field,
            hf_name=hf_name,
            hf_split=hf_split,
            cache_root=cache_dir,
        )
    ]


def load_windows(
    *,
    source: str,
    path: str,
    tokenizer: Tokenizer | str,
    seq_len: int,
    text_field: str = "text",
    hf_name: str = "",
    hf_split: str = "train",
    cache_dir: str | Path | None = None,
) -> PackedWindows:
    """Open (tokenizing and caching on first use) one source as windows of ``seq_len + 1`` tokens.

    ``source`` is ``demo`` (built-in KJV; ``path`` ignored), ``text`` (.txt /
    .jsonl files, folder or glob), ``shards`` (``scripts/prepare_data.py``
    output) or ``hf`` (Hugging Face ``datasets``). Load once and pass the
    result to ``split_loader`` for each split.
    """
    tok = build_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    shards = _load_shards(
        source, path, tok, text_field=text_field, hf_name=hf_name, hf_split=hf_split, cache_dir=cache_dir
    )
    windows = PackedWindows(shards, seq_len)
    logger.info("data %s/%s: %d tokens, %d windows of %d", source, path or "-", windows.num_tokens, len(windows),
                seq_len + 1)
    return windows


def split_loader(
    windows: PackedWindows,
    *,
    split: str,
    val_fraction: float,
    local_batch_size: int,
    dp_rank: int,
    dp_world_size: int,
    seed: int,
) -> TokenDataLoader:
    """The loader of one split on one DP rank. Train and val loaders of the same windows and
    val_fraction never share a window."""
    first, count = _split_range(len(windows), split, val_fraction)
    logger.info("split %s = windows [%d, %d)", split, first, first + count)
    return TokenDataLoader(
        windows,
        first_window=first,
        num_windows=count,
        local_batch_size=local_batch_size,
        dp_rank=dp_rank,
        dp_world_size=dp_world_size,
        seed=seed,
        train=split == "train",
    )


def heldout_loader(windows: PackedWindows, *, local_batch_size: int, dp_rank: int,
                   dp_world_size: int) -> TokenDataLoader:
    """A validation loader over *all* of ``windows``: a held-out set of its own (``data.val_path``),
    e.g. the documents a corpus builder split off, instead of the tail of the training data."""
    logger.info("held-out validation set = all %d windows", len(windows))
    return TokenDataLoader(windows, first_window=0, num_windows=len(windows), local_batch_size=local_batch_size,
                           dp_rank=dp_rank, dp_world_size=dp_world_size, seed=0, train=False)


def build_dataloader(
    *,
    source: str,
    path: str,
    tokenizer: Tokenizer | str,
    seq_len: int,
    local_batch_size: int,
    dp_rank: int,
    dp_world_size: int,
    split: str,
    val_fraction: float,
    seed: int,
    text_field: str = "text",
    hf_name: str = "",
    hf_split: str = "train",
    cache_dir: str | Path | None = None,
) -> TokenDataLoader:
    """``load_windows`` then ``split_loader``: a loader for one split of one source on one DP rank."""
    windows = load_windows(source=source, path=path, tokenizer=tokenizer, seq_len=seq_len, text_field=text_field,
                           hf_name=hf_name, hf_split=hf_split, cache_dir=cache_dir)
    return split_loader(windows, split=split, val_fraction=val_fraction, local_batch_size=local_batch_size,
                        dp_rank=dp_rank, dp_world_size=dp_world_size, seed=seed)
