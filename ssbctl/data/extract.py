"""Safe extraction of downloaded tar and zip archives into a dataset folder.

A downloaded archive is untrusted. Every member is checked *before anything is written*, against
the whole archive rather than against what happens to exist on disk (a check that resolves paths
on disk sees none of the links earlier members would create; that, and ``filter="data"`` of
Python < 3.11.13 being bypassable with over-long link chains (CVE-2025-4517), let a tar overwrite
files beside the dataset folder). The rules:

* names are relative, without ``..`` and without passing through a symbolic link of the archive
  or through a file of the archive;
* a symbolic link points, by a relative path without ``..``, to a regular file of the archive
  (never to a folder, nothing absolute, nothing outside);
* a hard link names a regular file that came earlier in the archive;
* no device files, FIFOs or zip entries marked as links;
* at most ``max_members`` members and ``max_bytes`` bytes once extracted, and at most
  ``max_ratio`` times the archive's own size (a "bomb" guard).

Then the archive is extracted by this module (not by ``tarfile``/``zipfile``) into a fresh hidden
folder inside the target, counting the bytes actually written (headers can lie), and the result is
moved into place only after the whole archive went through. A refused archive leaves the target as
it was.
"""

from __future__ import annotations

import os
import shutil
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from ssbctl.core.errors import DataError, UserError
from ssbctl.core.io import fresh_dir

GiB = 1 << 30
CHUNK = 1 << 20
RATIO_FLOOR = 64 << 20  # the ratio guard only applies beyond this many extracted bytes
ENV_BYTES = "SSBCTL_MAX_EXTRACT_BYTES"
ENV_MEMBERS = "SSBCTL_MAX_EXTRACT_MEMBERS"
ENV_RATIO = "SSBCTL_MAX_EXTRACT_RATIO"
Member = tarfile.TarInfo | zipfile.ZipInfo
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str, what: str) -> int:
    """``text`` as a byte count: a whole number, optionally with K, M, G or T (binary units)."""
    clean = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = clean[-1:] if clean[-1:] in _UNITS else ""
    number = clean[: len(clean) - len(unit)].strip()
    if not number.isdigit() or int(number) < 1:
        raise UserError(f"{what} must be a positive byte count such as 500G or 2000000000, got {text!r}")
    return int(number) * _UNITS[unit]


@dataclass(frozen=True)
class ExtractLimits:
    """How much one archive may expand to. The defaults fit the datasets ssbctl knows (MSR-VTT's
    videos are about 7 GB) with room to spare; raise them with ``--max-extract-bytes`` or the
    ``SSBCTL_MAX_EXTRACT_*`` environment variables."""

    max_bytes: int = 256 * GiB
    max_members: int = 1_000_000
    max_ratio: float = 200.0

    @classmethod
    def from_env(cls, max_bytes: str | None = None) -> ExtractLimits:
        """The defaults, overridden by the ``SSBCTL_MAX_EXTRACT_*`` environment variables, then by
        ``--max-extract-bytes`` (``max_bytes``); a malformed value is a UserError naming it."""
        default = cls()
        size = parse_size(max_bytes, "--max-extract-bytes") if max_bytes is not None else (
            parse_size(os.environ[ENV_BYTES], ENV_BYTES) if os.environ.get(ENV_BYTES) else default.max_bytes)
        members = os.environ.get(ENV_MEMBERS, "").strip()
        if members and (not members.isdigit() or int(members) < 1):
            raise UserError(f"{ENV_MEMBERS} must be a positive whole number, got {members!r}")
        ratio = os.environ.get(ENV_RATIO, "").strip()
        try:
            ratio_value = float(ratio) if ratio else default.max_ratio
        except ValueError:
            ratio_value = float("nan")
        if not ratio_value > 0:
            raise UserError(f"{ENV_RATIO} must be a positive number, got {ratio!r}")
        return cls(size, int(members) if members else default.max_members, ratio_value)


@dataclass(frozen=True)
class Entry:
    """One checked member: its clean relative name, what it is, and where its data comes from."""

    name: str
    kind: str  # "dir", "file", "symlink" or "hardlink"
    size: int = 0
    link: str = ""  # a symlink's target as written, or the clean name a hard link copies
    mode: int = 0o644
    mtime: float | None = None


def _short(name: str) -> str:
    """A member name cut to a readable length for a one-line message."""
    return name if len(name) <= 80 else f"{name[:48]}...{name[-24:]}"


def _refuse(archive: Path, message: str) -> DataError:
    return DataError(f"{archive.name}: {message}; refused")


def _clean(archive: Path, name: str) -> str:
    """A member name as a plain relative POSIX path ("" for the archive's top folder itself)."""
    parts = name.replace("\\", "/").split("/")
    if (not name or "\x00" in name or name.startswith(("/", "\\")) or ".." in parts
            or (len(name) > 1 and name[1] == ":")):
        raise _refuse(archive, f"member '{_short(name)}' would be written outside the target folder")
    return "/".join(p for p in name.split("/") if p not in ("", "."))


def _parents(name: str) -> Iterator[str]:
    """Every proper ancestor of a clean name: 'a/b/c' -> 'a', 'a/b'."""
    parts = name.split("/")
    for i in range(1, len(parts)):
        yield "/".join(parts[:i])


def _tar_entries(archive: Path, tar: tarfile.TarFile, limits: ExtractLimits) -> list[tuple[Entry, Member]]:
    """Every member of a tar as an Entry (refusing device files), at most ``max_members``."""
    out: list[tuple[Entry, Member]] = []
    for m in tar:
        if len(out) >= limits.max_members:
            raise _members_error(archive, limits)
        name = _clean(archive, m.name)
        if m.isdev():
            raise _refuse(archive, f"member '{_short(m.name)}' is a device file or FIFO")
        if m.isdir():
            entry = Entry(name, "dir")
        elif m.issym():
            entry = Entry(name, "symlink", link=m.linkname)
        elif m.islnk():
            entry = Entry(name, "hardlink", link=_clean(archive, m.linkname))
        elif m.isreg():
            entry = Entry(name, "file", m.size, mode=m.mode, mtime=m.mtime)
        else:
            raise _refuse(archive, f"member '{_short(m.name)}' has an unsupported type")
        out.append((entry, m))
    return out


def _zip_entries(archive: Path, zf: zipfile.ZipFile, limits: ExtractLimits) -> list[tuple[Entry, Member]]:
    """Every member of a zip as an Entry (refusing links and device files), at most ``max_members``."""
    infos = zf.infolist()
    if len(infos) > limits.max_members:
        raise _members_error(archive, limits)
    out: list[tuple[Entry, Member]] = []
    for info in infos:
        name = _clean(archive, info.filename)
        unix_mode = info.external_attr >> 16
        if stat.S_ISLNK(unix_mode):
            raise _refuse(archive, f"member '{_short(info.filename)}' is a symbolic link "
                                   f"(not allowed in zip archives)")
        if stat.S_IFMT(unix_mode) and not (stat.S_ISREG(unix_mode) or stat.S_ISDIR(unix_mode)):
            raise _refuse(archive, f"member '{_short(info.filename)}' is a device file or FIFO")
        entry = Entry(name, "dir") if info.is_dir() else Entry(name, "file", info.file_size, mode=unix_mode or 0o644)
        out.append((entry, info))
    return out


def _members_error(archive: Path, limits: ExtractLimits) -> DataError:
    return _refuse(archive, f"more than {limits.max_members} members (raise with {ENV_MEMBERS})")


def _bytes_error(archive: Path, limits: ExtractLimits, what: str) -> DataError:
    return _refuse(archive, f"{what} more than {limits.max_bytes} bytes "
                            f"(raise with --max-extract-bytes or {ENV_BYTES})")


def check_entries(archive: Path, entries: list[Entry], limits: ExtractLimits) -> None:
    """Raise DataError unless every entry stays inside the archive's own tree (see the module doc)."""
    symlinks = {e.name for e in entries if e.kind == "symlink"}
    files = {e.name for e in entries if e.kind in ("file", "hardlink")}
    dirs = {e.name for e in entries if e.kind == "dir"}
    not_links = files | dirs
    earlier_files: set[str] = set()
    for e in entries:
        if not e.name:
            if e.kind != "dir":
                raise _refuse(archive, "a member has an empty name")
            continue
        for parent in _parents(e.name):
            if parent in symlinks:
                raise _refuse(archive, f"member '{_short(e.name)}' passes through the symbolic link '{_short(parent)}'")
            if parent in files:
                raise _refuse(archive, f"member '{_short(e.name)}' uses the file '{_short(parent)}' as a folder")
        if e.name in symlinks and (e.kind != "symlink" or e.name in not_links):
            raise _refuse(archive, f"member '{_short(e.name)}' is both a symbolic link and something else")
        if e.name in dirs and e.name in files:
            raise _refuse(archive, f"member '{_short(e.name)}' is both a folder and a file")
        if e.kind == "symlink":
            _check_symlink(archive, e, files)
        elif e.kind == "hardlink" and (e.link not in earlier_files or e.link == e.name):
            raise _refuse(archive, f"hard link '{_short(e.name)}' -> '{_short(e.link)}' does not name an earlier "
                                   f"file of the archive")
        if e.kind in ("file", "hardlink"):
            earlier_files.add(e.name)
    total = sum(e.size for e in entries if e.kind == "file")
    if total > limits.max_bytes:
        raise _bytes_error(archive, limits, "its headers announce")
    _check_ratio(archive, total, limits)


def _check_symlink(archive: Path, e: Entry, files: set[str]) -> None:
    """A symbolic link must point, relatively and without ``..``, to a regular file of the archive."""
    target = e.link
    what = f"symbolic link '{_short(e.name)}' -> '{_short(target)}'"
    if not target or target.startswith(("/", "\\")) or ".." in target.replace("\\", "/").split("/"):
        raise _refuse(archive, f"{what} points outside the archive's files")
    resolved = "/".join(p for p in str(PurePosixPath(e.name).parent / target).split("/") if p not in ("", "."))
    if resolved not in files:
        raise _refuse(archive, f"{what} does not point to a file of the archive")


def _check_ratio(archive: Path, total: int, limits: ExtractLimits) -> None:
    """Refuse an archive that expands to more than ``max_ratio`` times its own size (a bomb)."""
    size = max(archive.stat().st_size, 1)
    if total > RATIO_FLOOR and total > limits.max_ratio * size:
        raise _refuse(archive, f"it expands to {total} bytes, {total / size:.0f} times its size "
                               f"(limit {limits.max_ratio:g}; raise with {ENV_RATIO})")


class _Writer:
    """Writes checked entries under a fresh folder, counting the bytes that really arrive."""

    def __init__(self, archive: Path, root: Path, limits: ExtractLimits) -> None:
        self.archive, self.root, self.limits, self.written = archive, root, limits, 0

    def write(self, entry: Entry, data: IO[bytes] | None) -> None:
        path = self.root / entry.name
        if entry.kind == "dir":
            path.mkdir(parents=True, exist_ok=True)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if os.path.lexists(path):  # a repeated name: the later member wins, as with tar
            path.unlink()
        if entry.kind == "symlink":
            os.symlink(entry.link, path)
        elif entry.kind == "hardlink":
            try:
                os.link(self.root / entry.link, path, follow_symlinks=False)
            except OSError:  # a file system without hard links: a copy reads the same
                shutil.copyfile(self.root / entry.link, path, follow_symlinks=False)
        else:
            self._write_file(entry, path, data)

    def _write_file(self, entry: Entry, path: Path, data: IO[bytes] | None) -> None:
        mode = 0o755 if entry.mode & 0o111 else 0o644
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
        got = 0
        with os.fdopen(fd, "wb") as fh:
            while data is not None and (block := data.read(CHUNK)):
                got += len(block)
                self.written += len(block)
                if got > entry.size:
                    raise _refuse(self.archive, f"member '{_short(entry.name)}' holds more data than its "
                                                f"header says")
                if self.written > self.limits.max_bytes:
                    raise _bytes_error(self.archive, self.limits, "it expands to")
                fh.write(block)
        if entry.mtime is not None:
            os.utime(path, (entry.mtime, entry.mtime))


def _merge(src: Path, dst: Path, move: bool) -> None:
    """Move the extracted tree ``src`` into ``dst`` (merging folders); with ``move=False`` only
    check that nothing would put a folder on a file or a file on a folder."""
    for child in sorted(src.iterdir()):
        there = dst / child.name
        real_dir = child.is_dir() and not child.is_symlink()
        if real_dir and there.is_dir():
            _merge(child, there, move)
        elif (real_dir and os.path.lexists(there)) or (not real_dir and there.is_dir() and not there.is_symlink()):
            raise DataError(f"cannot extract '{child.name}' into {dst}: a {'file' if real_dir else 'folder'} "
                            f"of that name is in the way; refused")
        elif move:
            os.replace(child, there)  # replaces a file or link itself, never what a link points to


def _open(archive: Path) -> tarfile.TarFile | zipfile.ZipFile:
    if tarfile.is_tarfile(archive):
        return tarfile.open(archive)
    if zipfile.is_zipfile(archive):
        return zipfile.ZipFile(archive)
    raise DataError(f"{archive.name} is neither a tar nor a zip archive")


def extract(archive: Path, target: Path, limits: ExtractLimits | None = None) -> None:
    """Extract a tar or zip archive into ``target`` after checking every member (see the module
    doc); what ``target`` holds under other names stays as it is, same names are replaced."""
    limits = limits or ExtractLimits()
    target.mkdir(parents=True, exist_ok=True)
    try:
        with _open(archive) as arc:
            pairs = (_tar_entries(archive, arc, limits) if isinstance(arc, tarfile.TarFile)
                     else _zip_entries(archive, arc, limits))
            check_entries(archive, [e for e, _ in pairs], limits)
            tmp = target / f".{archive.name}.extract.tmp"
            if tmp.is_symlink():
                tmp.unlink()
            fresh_dir(tmp)
            try:
                _write_all(archive, arc, pairs, tmp, limits)
                _merge(tmp, target, move=False)
                _merge(tmp, target, move=True)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    except (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError) as exc:
        raise DataError(f"{archive.name}: cannot read the archive ({exc})") from None


def _write_all(archive: Path, arc: tarfile.TarFile | zipfile.ZipFile, pairs: list[tuple[Entry, Member]],
               tmp: Path, limits: ExtractLimits) -> None:
    """Write every checked entry under ``tmp``, in archive order."""
    writer = _Writer(archive, tmp, limits)
    for entry, member in pairs:
        try:
            if entry.kind != "file":
                writer.write(entry, None)
            elif isinstance(arc, tarfile.TarFile) and isinstance(member, tarfile.TarInfo):
                with arc.extractfile(member) as data:  # type: ignore[union-attr]  # a regular file has data
                    writer.write(entry, data)
            elif isinstance(arc, zipfile.ZipFile) and isinstance(member, zipfile.ZipInfo):
                with arc.open(member) as data:
                    writer.write(entry, data)
        except OSError as exc:  # a name too long for this file system, a full disk
            raise DataError(f"{archive.name}: cannot extract '{_short(entry.name)}': {exc.strerror or exc}") from None
