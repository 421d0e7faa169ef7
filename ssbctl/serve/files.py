"""Serving an index's video files safely: only the files its rows record, only inside the folder the
index was built from, never a path taken from a request; and HTTP Range parsing for seeking.

A request names a video by its index id. The row's recorded path is resolved (symlinks followed)
at every request, and the file is served only when the resolved path is a regular video file
inside the index's video folder (resolved once at start-up), so a file swapped for a symlink to
``/etc/passwd`` after indexing is refused. The file is opened with ``O_NOFOLLOW`` and checked
again through its descriptor before a byte is sent.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ssbctl.data.video import VIDEO_SUFFIXES

CHUNK = 256 * 1024  # bytes read per step while streaming a file
RANGE = re.compile(r"\s*bytes\s*=\s*([0-9]{0,18})\s*-\s*([0-9]{0,18})\s*", re.IGNORECASE)  # one range, ASCII digits
CONTENT_TYPES = {".mp4": "video/mp4", ".m4v": "video/mp4", ".webm": "video/webm", ".mkv": "video/x-matroska",
                 ".mov": "video/quicktime", ".avi": "video/x-msvideo"}


class RequestError(Exception):
    """A request the server answers with an HTTP error status and a one-line message."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def video_root(meta: dict[str, Any], videos: list[dict[str, Any]]) -> Path | None:
    """The folder whose files the server may send: the source folder ``index.json`` records when
    every row's path lies in it (``index --videos``), else the deepest folder holding every row's
    video (an index of prepared data records the data folder, not the videos' one). Resolved
    (a root that is itself a symlink is followed once, here). None when no row has a path."""
    paths = [os.path.abspath(v["path"]) for v in videos if v.get("path")]
    if not paths:
        return None
    source = meta.get("source")
    if isinstance(source, str) and source:
        root = os.path.abspath(source)
        if all(os.path.commonpath([root, p]) == root for p in paths):
            return Path(root).resolve()
    return Path(os.path.commonpath([os.path.dirname(p) for p in paths])).resolve()


@dataclass
class OpenVideo:
    """A video file opened for sending: its descriptor, size, modification time and media type."""

    fd: int
    path: Path  # resolved and checked
    size: int
    mtime_ns: int
    content_type: str

    def chunks(self, start: int, end: int) -> Iterator[bytes]:
        """Bytes ``start..end`` (inclusive) in chunks; the descriptor is closed when done or dropped."""
        try:
            pos = start
            while pos <= end:
                data = os.pread(self.fd, min(CHUNK, end - pos + 1), pos)
                if not data:  # the file shrank while being sent
                    return
                pos += len(data)
                yield data
        finally:
            self.close()

    def close(self) -> None:
        """Close the descriptor (once)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def open_video(recorded: str, root: Path | None, video_id: str) -> OpenVideo:
    """Open an index row's video file for reading, refusing anything outside ``root``.

    403 when the resolved file is outside the video folder or not a video file; 404 when it is gone."""
    if root is None or not recorded:
        raise RequestError(404, f"video {video_id!r} has no file in this index")
    try:
        resolved = Path(recorded).resolve(strict=True)
    except (OSError, RuntimeError):  # missing, or a symlink loop
        raise RequestError(404, f"the file of video {video_id!r} is gone") from None
    if not resolved.is_relative_to(root):
        raise RequestError(403, f"refused: the file of video {video_id!r} is outside the indexed folder")
    if resolved.suffix.lower() not in VIDEO_SUFFIXES:
        raise RequestError(403, f"refused: the file of video {video_id!r} is not a video file")
    try:
        fd = os.open(resolved, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except OSError:  # swapped for a symlink between resolve and open, removed, or unreadable
        raise RequestError(404, f"the file of video {video_id!r} cannot be opened") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise RequestError(403, f"refused: the file of video {video_id!r} is not a regular file")
    return OpenVideo(fd, resolved, info.st_size, info.st_mtime_ns,
                     CONTENT_TYPES.get(resolved.suffix.lower(), "application/octet-stream"))


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The inclusive byte range ``(start, end)`` a ``Range`` header asks of a ``size``-byte file;
    None when there is no header (send it whole).

    One range of bytes (``a-b``, ``a-``, ``-n``) is served; anything else (several ranges, another
    unit, malformed numbers, a start past the end) is a 416 carrying ``Content-Range: bytes */size``,
    so a client learns the size instead of silently getting bytes it did not ask for."""
    if header is None:
        return None
    unsatisfiable = RequestError(416, f"range not satisfiable: {header[:80]!r} of a {size}-byte file",
                            {"Content-Range": f"bytes */{size}"})
    match = RANGE.fullmatch(header)
    if match is None:
        raise unsatisfiable
    first, last = match.groups()
    if not first and not last:
        raise unsatisfiable
    if not first:  # suffix: the last n bytes
        n = int(last)
        if n == 0 or size == 0:
            raise unsatisfiable
        return max(0, size - n), size - 1
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if start >= size or (last and int(last) < start):
        raise unsatisfiable
    return start, end
