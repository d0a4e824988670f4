"""The held-out split, by document, stratified by source, reproducible from the seed alone.

Each document's rank is sha256(seed, id): a function of the document only, so adding a source
or a document does not move any other document between splits. Within every source the
``round(val_fraction * n)`` lowest ranks are held out, so each source is represented in
validation in proportion to its document count (a global draw could miss a small source
entirely). Both splits are written in rank order, i.e. sources interleaved: a reader that takes a
tail or a prefix of either file still gets a mix.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from hydra_titan.corpus.document import Document


@dataclass(frozen=True)
class Split:
    train: list[Document]
    val: list[Document]


def split_rank(doc_id: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}\x00{doc_id}".encode("utf-8")).hexdigest()


def held_out_split(documents: Sequence[Document], val_fraction: float, seed: int) -> Split:
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    ranked = sorted(documents, key=lambda d: split_rank(d.doc_id, seed))
    by_source: dict[str, list[Document]] = {}
    for doc in ranked:
        by_source.setdefault(doc.source, []).append(doc)
    val_ids = {d.doc_id for group in by_source.values() for d in group[:int(val_fraction * len(group) + 0.5)]}
    return Split(train=[d for d in ranked if d.doc_id not in val_ids], val=[d for d in ranked if d.doc_id in val_ids])


def cap_bytes(documents: Sequence[Document], max_bytes: int) -> list[Document]:
    """The longest prefix (in the given order) whose UTF-8 size is at most ``max_bytes``."""
    out, total = [], 0
    for doc in documents:
        total += doc.num_bytes
        if total > max_bytes:
            break
        out.append(doc)
    return out
