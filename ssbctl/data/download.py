"""``prepare --download``: fetch a dataset's files, resume broken transfers, check, extract safely.

Downloads stream to ``NAME.part`` and resume with an HTTP Range request after an interruption;
a SHA-256 is checked when one is known (a mismatch removes the file and fails). Archives are
checked member by member before anything is written and extracted by :mod:`ssbctl.data.extract`
(nothing outside the target folder, bounded size). What the user gives (``--url``, ``--sha256``)
is checked by :func:`check_download_options` before any work starts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import re
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ssbctl.core.errors import DataError, UserError
from ssbctl.core.io import atomic_write_bytes
from ssbctl.data.extract import ExtractLimits, extract

__all__ = ["AUTO_DOWNLOAD", "MIRROR_ENV", "Source", "SOURCES", "check_download_options", "describe_download",
           "download", "extract", "fetch_dataset", "file_name", "mirrored", "normalize_sha256", "remote_size",
           "sha256_of", "sources_for"]

Progress = Callable[[int, int], None]
CHUNK = 1 << 20


@dataclass(frozen=True)
class Source:
    """One file a dataset is made of, and what it is checked against."""

    url: str
    sha256: str | None = None  # hex digest, when the publisher gives one
    note: str = ""


# Where each dataset's publishers (or the CLIP4Clip release) put its files. Override with --url.
SOURCES: dict[str, list[Source]] = {
    "msrvtt": [Source("https://www.robots.ox.ac.uk/~maxbain/frozen-in-time/data/MSRVTT.zip",
                      note="videos and MSRVTT_data.json; the 9k and 1k-A split files ship with ssbctl")],
    "msvd": [Source("https://www.cs.utexas.edu/users/ml/clamp/videoDescription/YouTubeClips.tar",
                    note="the 1,970 videos (YouTubeClips/ID.avi)"),
             Source("https://www.cs.utexas.edu/users/ml/clamp/videoDescription/AllVideoDescriptions.txt",
                    note="the English captions; the split lists ship with ssbctl")],
    "vatex": [Source("https://eric-xw.github.io/vatex-website/data/vatex_training_v1.0.json"),
              Source("https://eric-xw.github.io/vatex-website/data/vatex_validation_v1.0.json",
                     note="annotations only: VATEX videos are YouTube clips you must fetch yourself")],
    "activitynet": [Source("https://cs.stanford.edu/people/ranjaykrishna/densevid/captions.zip",
                           note="annotations only: ActivityNet videos are distributed on request")],
    "didemo": [Source("https://raw.githubusercontent.com/LisaAnne/LocalizingMoments/master/data/train_data.json"),
               Source("https://raw.githubusercontent.com/LisaAnne/LocalizingMoments/master/data/val_data.json"),
               Source("https://raw.githubusercontent.com/LisaAnne/LocalizingMoments/master/data/test_data.json",
                      note="annotations only: DiDeMo videos come from the YFCC100M release")],
}


# Datasets whose publishers serve everything prepare needs (videos and captions): `prepare NAME`
# without --root downloads them into $SSBCTL_HOME/raw/NAME when that folder is empty. The others
# serve annotations only (their videos come from YouTube, on request...) or through third parties.
AUTO_DOWNLOAD = ("msvd",)
# A base URL that replaces every known source's folder: SOURCE is fetched from $SSBCTL_MIRROR/NAME/FILE
# (a local copy of the publishers' files, a proxy, or a test server).
MIRROR_ENV = "SSBCTL_MIRROR"

URL_SCHEMES = ("http", "https", "ftp", "file")
_HEX64 = re.compile(r"[0-9a-f]{64}")


def normalize_sha256(value: str) -> str:
    """A SHA-256 as lower-case hex (publishers print either case); UserError unless 64 hex digits."""
    digest = value.strip().lower()
    if not _HEX64.fullmatch(digest):
        raise UserError(f"--sha256 must be 64 hexadecimal digits, got {value!r}")
    return digest


def check_url(url: str) -> None:
    """UserError unless ``url`` has a scheme urllib fetches and ends in a usable file name."""
    scheme = urllib.parse.urlparse(url).scheme.lower()
    if scheme not in URL_SCHEMES:
        raise UserError(f"--url needs a scheme ({', '.join(s + '://' for s in URL_SCHEMES)}), got {url!r}")
    name = PurePosixPath(urllib.parse.urlparse(url).path).name
    if not name or name in (".", ".."):
        raise UserError(f"--url must end in a file name (like .../videos.zip), got {url!r}")


def check_download_options(download: bool, urls: list[str] | None, sha256: str | None) -> str | None:
    """Check ``--download``/``--url``/``--sha256`` before any work; return the normalised SHA-256."""
    if (urls or sha256) and not download:
        raise UserError(f"{'--url' if urls else '--sha256'} needs --download (without it nothing is fetched)")
    for url in urls or []:
        check_url(url)
    if sha256 is None:
        return None
    if not urls or len(urls) != 1:
        raise UserError("--sha256 goes with exactly one --url")
    return normalize_sha256(sha256)


def sources_for(dataset: str, urls: list[str] | None = None, sha256: str | None = None) -> list[Source]:
    """The table's sources for ``dataset``, or the given URLs (with an optional checksum for one URL)."""
    if urls:
        if sha256 and len(urls) != 1:
            raise UserError("--sha256 goes with exactly one --url")
        for url in urls:
            check_url(url)
        return [Source(u, normalize_sha256(sha256) if sha256 else None) for u in urls]
    if dataset not in SOURCES:
        raise UserError(f"no known download for '{dataset}'; give --url")
    return mirrored(dataset, SOURCES[dataset])


def mirrored(dataset: str, sources: list[Source]) -> list[Source]:
    """``sources`` fetched from ``$SSBCTL_MIRROR/DATASET/FILE`` when that variable is set (same checksums)."""
    import os

    base = os.environ.get(MIRROR_ENV, "").strip().rstrip("/")
    if not base:
        return sources
    out = [dataclasses.replace(s, url=f"{base}/{dataset}/{file_name(s.url)}") for s in sources]
    for source in out:
        try:
            check_url(source.url)
        except UserError:
            raise UserError(f"${MIRROR_ENV} must be a URL like https://host/folder, got {base!r}") from None
    return out


def remote_size(url: str, timeout: float = 20.0) -> int | None:
    """The size in bytes a server announces for ``url`` (HEAD request), or None when it does not say."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout) as response:
            length = response.headers.get("Content-Length")
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError):
        return None
    return int(length) if length is not None and length.isdigit() else None


def describe_download(sources: list[Source]) -> tuple[list[str], int | None]:
    """One line per source (file name, size, what it is) and the total size (None when unknown)."""
    lines: list[str] = []
    total: int | None = 0
    for source in sources:
        size = remote_size(source.url)
        total = total + size if total is not None and size is not None else None
        shown = human_size(size) if size is not None else "size unknown"
        note = f": {source.note}" if source.note else ""
        lines.append(f"{file_name(source.url)} ({shown}) from {source.url}{note}")
    return lines, total


def human_size(n: int) -> str:
    """Bytes as a short human size: 1.7 GB, 3.1 MB, 512 B."""
    size = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"


def file_name(url: str) -> str:
    """The file name a URL is saved under."""
    name = PurePosixPath(urllib.parse.urlparse(url).path).name
    if not name or name in (".", ".."):
        raise UserError(f"cannot tell a file name from URL {url}")
    return name


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _fetch_once(url: str, part: Path, progress: Progress | None, timeout: float) -> bool:
    """Continue ``part`` from its current size; True when the server says the file is complete."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # nothing left to send: the part is whole
            return True
        raise
    with response:
        if have and response.status != 206:
            have = 0  # the server ignored the range: start over
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else -1
        with open(part, "ab" if have else "wb") as fh:
            while True:
                block = response.read(CHUNK)
                if not block:
                    break
                fh.write(block)
                have += len(block)
                if progress:
                    progress(have, max(total, have))
    return total < 0 or have >= total


def download(source: Source, folder: Path, progress: Progress | None = None, retries: int = 5,
             timeout: float = 60.0) -> Path:
    """Download ``source`` into ``folder`` (resuming a ``.part``), check it, return its path."""
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / file_name(source.url)
    expected = source.sha256.lower() if source.sha256 is not None else None
    if dest.is_file() and (expected is None or sha256_of(dest) == expected):
        return dest
    part = dest.with_name(dest.name + ".part")
    for attempt in range(retries + 1):
        try:
            if _fetch_once(source.url, part, progress, timeout):
                break
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError, OSError) as exc:
            if isinstance(exc, urllib.error.HTTPError) and exc.code < 500:
                raise DataError(f"download of {source.url} failed: HTTP {exc.code}") from None
            if attempt == retries:
                raise DataError(f"download of {source.url} failed after {retries + 1} tries: {exc}") from None
        time.sleep(min(2 ** attempt * 0.1, 5))
    else:
        raise DataError(f"download of {source.url} did not complete after {retries + 1} tries")
    if expected is not None:
        actual = sha256_of(part)
        if actual != expected:
            part.unlink()
            raise DataError(f"{dest.name}: SHA-256 is {actual}, expected {source.sha256}; the file was removed")
    part.replace(dest)
    return dest


def fetch_dataset(dataset: str, root: Path, urls: list[str] | None = None, sha256: str | None = None,
                  progress: Callable[[str], Progress] | None = None,
                  limits: ExtractLimits | None = None) -> list[Path]:
    """Download every source of ``dataset`` into ``root/downloads`` and extract archives into ``root``
    (each within ``limits``)."""
    paths = []
    for source in sources_for(dataset, urls, sha256):
        path = download(source, root / "downloads", progress(file_name(source.url)) if progress else None)
        if tarfile.is_tarfile(path) or zipfile.is_zipfile(path):
            extract(path, root, limits)
        else:
            atomic_write_bytes(root / path.name, path.read_bytes())
        paths.append(path)
    return paths
