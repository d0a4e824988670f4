"""Read SWORD zText / zCom modules (compressed Bibles and commentaries) without libsword.

A module is a ``mods.d/NAME.conf`` plus, per testament (``ot``, ``nt``), three files named
``{testament}.{b|c|v}z{s|v|z}`` (the letter is the compression unit: book, chapter or verse):

* ``.?zs`` block index: one 12-byte entry per compressed block, little-endian u32
  (offset in ``.?zz``, compressed size, uncompressed size);
* ``.?zv`` verse index: one entry per versification slot (module, testament, book and chapter
  headings, then each verse) giving (block number, offset in the uncompressed block, size); the
  ``*4`` drivers (zText4, zCom4) widen the size to u32, giving 12-byte instead of 10-byte entries;
* ``.?zz`` the blocks, each compressed with ``CompressType`` (ZIP = zlib).

Commentaries point every verse of a passage at the same entry ("Verses 3-5"), so an entry is read
once, at its first slot. The layout of ``.?zv`` is taken from the data, not only from the conf:
the Debian ``sword-comm-mhcc`` conf says zCom4 but its index holds 10-byte entries, and reading it
as 12 bytes gives garbage. The width whose every entry lies inside its block wins.

A document is a chapter: modules made by osis2mod keep OSIS ``<chapter sID=.../>`` and
``<chapter eID=.../>`` milestones in the text, so chapters are found without versification tables.
Text between one chapter's end and the next one's start (a book's title and introduction) opens
the next chapter. A module without chapter milestones falls back to one document per block.
"""

from __future__ import annotations

import bz2
import logging
import lzma
import re
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from hydra_titan.corpus.osis import osis_to_text

logger = logging.getLogger(__name__)

TESTAMENTS = ("ot", "nt")
_BLOCK_ENTRY = struct.Struct("<III")
_VERSE_ENTRY = {10: struct.Struct("<IIH"), 12: struct.Struct("<III")}
_DECOMPRESS: dict[str, Callable[[bytes], bytes]] = {"ZIP": zlib.decompress, "BZIP2": bz2.decompress, "XZ": lzma.decompress}
_CHAPTER_START = re.compile(r'<chapter\b[^>]*?\bsID="([^"]+)"[^>]*/>')
_CHAPTER_END = re.compile(r'<chapter\b[^>]*?\beID="[^"]+"[^>]*/>')


class SwordFormatError(ValueError):
    """A module whose files do not have the layout described above."""


@dataclass(frozen=True)
class SwordModule:
    """What the conf says about one module, resolved to its data folder."""

    name: str
    data_dir: Path
    driver: str
    compress: str
    encoding: str
    licence: str
    description: str

    @property
    def declared_verse_width(self) -> int:
        return 12 if self.driver.endswith("4") else 10


@dataclass(frozen=True)
class _Block:
    offset: int
    compressed: int
    size: int


def parse_conf(text: str) -> dict[str, str]:
    """The first section of a SWORD conf as key -> value (first value of repeated keys, the section
    name under ``""``); continuation lines (a trailing backslash) are skipped."""
    conf: dict[str, str] = {}
    continued = False
    for line in text.splitlines():
        if continued:
            continued = line.endswith("\\")
            continue
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            if "" in conf:
                break
            conf[""] = line.strip("[]")
            continue
        key, sep, value = line.partition("=")
        if sep:
            conf.setdefault(key.strip(), value.strip())
            continued = value.endswith("\\")
    return conf


def find_modules(root: Path) -> list[SwordModule]:
    """Every zText/zCom module under ``root`` (a SWORD library: ``mods.d/`` beside ``modules/``)."""
    modules = []
    for conf_path in sorted(Path(root).rglob("mods.d/*.conf")):
        conf = parse_conf(conf_path.read_text(encoding="utf-8", errors="replace"))
        driver = conf.get("ModDrv", "")
        if driver.lower() not in ("ztext", "ztext4", "zcom", "zcom4"):
            logger.warning("%s: driver %r is not zText/zCom; skipped", conf_path, driver)
            continue
        if conf.get("CipherKey"):
            raise SwordFormatError(f"{conf_path}: module {conf.get('')!r} is encrypted (CipherKey set)")
        data_dir = (conf_path.parent.parent / conf.get("DataPath", "")).resolve()
        modules.append(SwordModule(
            name=conf.get("", conf_path.stem),
            data_dir=data_dir,
            driver=driver,
            compress=conf.get("CompressType", "ZIP").upper(),
            encoding="utf-8" if conf.get("Encoding", "").upper() == "UTF-8" else "latin-1",
            licence=conf.get("DistributionLicense", "unknown"),
            description=conf.get("Description", ""),
        ))
    return modules


def _testament_files(module: SwordModule, testament: str) -> tuple[Path, Path, Path] | None:
    indexes = sorted(module.data_dir.glob(f"{testament}.?zs"))
    if not indexes:
        return None
    stem = indexes[0].with_suffix("")
    letter = indexes[0].suffix[1]
    files = tuple(stem.with_suffix(f".{letter}z{kind}") for kind in "svz")
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise SwordFormatError(f"module {module.name}: {testament} lacks {', '.join(missing)}")
    return files  # type: ignore[return-value]


def _verse_entries(raw: bytes, blocks: list[_Block], declared: int, where: str) -> list[tuple[int, int, int]]:
    """Decode the verse index with the declared entry width, or the other one if only it fits."""
    for width in (declared, 22 - declared):
        if len(raw) % width:
            continue
        entries = list(_VERSE_ENTRY[width].iter_unpack(raw))
        if all(size == 0 or (block < len(blocks) and offset + size <= blocks[block].size)
               for block, offset, size in entries):
            if width != declared:
                logger.warning("%s: verse index has %d-byte entries, not the %d its driver declares", where, width, declared)
            return entries
    raise SwordFormatError(f"{where}: verse index ({len(raw)} bytes) fits neither 10- nor 12-byte entries")


def testament_entries(module: SwordModule, testament: str) -> Iterator[tuple[int, str]]:
    """(block number, OSIS text) of each distinct non-empty entry, in index order."""
    files = _testament_files(module, testament)
    if files is None:
        return
    block_path, verse_path, data_path = files
    where = f"module {module.name} ({verse_path.name})"
    blocks = [_Block(*e) for e in _BLOCK_ENTRY.iter_unpack(block_path.read_bytes())]
    if not blocks:
        return
    entries = _verse_entries(verse_path.read_bytes(), blocks, module.declared_verse_width, where)
    try:
        decompress = _DECOMPRESS[module.compress]
    except KeyError:
        raise SwordFormatError(f"module {module.name}: CompressType {module.compress} is not supported "
                               f"(supported: {', '.join(_DECOMPRESS)})") from None
    data = data_path.read_bytes()
    cache: dict[int, bytes] = {}
    seen: set[tuple[int, int]] = set()
    for block, offset, size in entries:
        if size == 0 or (block, offset) in seen:
            continue
        seen.add((block, offset))
        if block not in cache:
            b = blocks[block]
            cache[block] = decompress(data[b.offset:b.offset + b.compressed])
            if len(cache[block]) != b.size:
                raise SwordFormatError(f"{where}: block {block} inflates to {len(cache[block])} bytes, index says {b.size}")
        yield block, cache[block][offset:offset + size].decode(module.encoding, errors="replace")


def split_chapters(osis: str) -> list[tuple[str, str]]:
    """(osisID, OSIS text) per chapter milestone; text after a chapter's end opens the next one."""
    starts = list(_CHAPTER_START.finditer(osis))
    chapters = []
    carry = osis[:starts[0].start()] if starts else ""
    for i, start in enumerate(starts):
        last = i + 1 == len(starts)
        body = osis[start.end():len(osis) if last else starts[i + 1].start()]
        end = None if last else _CHAPTER_END.search(body)
        inside, carry_next = (body, "") if end is None else (body[:end.start()], body[end.end():])
        chapters.append((start.group(1), carry + inside))
        carry = carry_next
    return chapters


def module_documents(module: SwordModule) -> Iterator[tuple[str, str]]:
    """(unit id, plain text) per chapter of both testaments (per block without chapter marks).

    A chapter whose milestone occurs twice (the Debian Scofield module opens Matt.1 twice) is one
    document: its parts are joined in index order.
    """
    chapters: dict[str, list[str]] = {}
    for testament in TESTAMENTS:
        entries = list(testament_entries(module, testament))
        found = split_chapters(" ".join(text for _, text in entries))
        if not found and entries:
            logger.warning("module %s (%s): no chapter milestones; one document per block", module.name, testament)
            by_block: dict[int, list[str]] = {}
            for block, text in entries:
                by_block.setdefault(block, []).append(text)
            found = [(f"{testament}.block{b}", " ".join(parts)) for b, parts in by_block.items()]
        for unit, osis in found:
            chapters.setdefault(unit, []).append(osis)
    for unit, parts in chapters.items():
        yield unit, osis_to_text("\n".join(parts))
