"""Exact and near-duplicate document removal.

Exact: documents whose normalised text (NFKC, case-folded, whitespace collapsed) has the same
sha256; the first in corpus order is kept. Near: MinHash signatures of word 5-gram shingles,
indexed by ``datasketch``'s LSH (a maintained, MIT, numpy-only library: no reason to write our
own). A document whose estimated Jaccard similarity to an already kept one reaches the threshold
is dropped; LSH only proposes candidates, the estimate over all permutations decides, so a
banding false positive does not remove anything. The bands are tuned for min(threshold, 0.9):
datasketch cannot band for higher thresholds (fewer than two bands), and a lower banding threshold
only proposes more candidates for the estimate to reject. Corpus order decides which copy survives, so
the result is deterministic.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from hydra_titan.corpus.document import Document

_WORD = re.compile(r"\w+")
_WS = re.compile(r"\s+")
_MAX_BAND_THRESHOLD = 0.9
_UPDATE_CHUNK = 50_000  # shingles hashed per update_batch call: bounds the (chunk x num_perm) array


@dataclass(frozen=True)
class DedupConfig:
    shingle_words: int = 5
    num_perm: int = 128
    threshold: float = 0.8
    seed: int = 1


@dataclass
class DedupResult:
    kept: list[Document] = field(default_factory=list)
    exact: list[tuple[str, str]] = field(default_factory=list)  # (removed id, kept id)
    near: list[tuple[str, str, float]] = field(default_factory=list)  # (removed, kept, est. Jaccard)


def normalize(text: str) -> str:
    return _WS.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def exact_key(text: str) -> str:
    return hashlib.sha256(normalize(text).encode("utf-8")).hexdigest()


def shingles(text: str, k: int) -> set[str]:
    """Word k-grams of the normalised text; a text of fewer than k words is one shingle."""
    words = _WORD.findall(normalize(text))
    if len(words) < k:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i:i + k]) for i in range(len(words) - k + 1)}


def jaccard(a: set[str], b: set[str]) -> float:
    """Exact Jaccard similarity of two shingle sets (for reports and tests)."""
    return len(a & b) / len(a | b) if a or b else 1.0


class _Signer:
    """MinHash signatures with one set of permutations shared by every document."""

    def __init__(self, config: DedupConfig) -> None:
        from datasketch import MinHash

        self._cls = MinHash
        self._config = config
        self._template = MinHash(num_perm=config.num_perm, seed=config.seed)

    def sign(self, text: str):
        m = self._cls(num_perm=self._config.num_perm, seed=self._config.seed,
                      permutations=self._template.permutations, scheme=self._template.scheme)
        items = [s.encode("utf-8") for s in shingles(text, self._config.shingle_words)]
        for i in range(0, len(items), _UPDATE_CHUNK):
            m.update_batch(items[i:i + _UPDATE_CHUNK])
        return m


def deduplicate(documents: Iterable[Document], config: DedupConfig = DedupConfig()) -> DedupResult:
    """Drop exact, then near duplicates; keep the first of each group in the given order."""
    try:
        from datasketch import MinHashLSH
    except ImportError as exc:
        raise ImportError("near-duplicate removal needs datasketch: pip install 'datasketch>=2.0'") from exc
    result = DedupResult()
    first_by_key: dict[str, str] = {}
    signer = _Signer(config)
    lsh = MinHashLSH(threshold=min(config.threshold, _MAX_BAND_THRESHOLD), num_perm=config.num_perm)
    kept_signatures: dict[str, np.ndarray] = {}
    order: dict[str, int] = {}
    for doc in documents:
        key = exact_key(doc.text)
        if key in first_by_key:
            result.exact.append((doc.doc_id, first_by_key[key]))
            continue
        first_by_key[key] = doc.doc_id
        m = signer.sign(doc.text)
        best = None
        for candidate in lsh.query(m):
            est = float(np.mean(kept_signatures[candidate] == m.hashvalues))
            if est >= config.threshold and (best is None or (est, -order[candidate]) > (best[1], -order[best[0]])):
                best = (candidate, est)
        if best is not None:
            result.near.append((doc.doc_id, best[0], round(best[1], 4)))
            first_by_key[key] = best[0]  # a later exact copy of this text is a copy of the kept one
            continue
        lsh.insert(doc.doc_id, m)
        kept_signatures[doc.doc_id] = m.hashvalues.copy()
        order[doc.doc_id] = len(order)
        result.kept.append(doc)
    return result
