"""Downloads against a local HTTP server on 127.0.0.1: resume after a broken connection, checksum,
safe extraction, and `prepare --download` end to end."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest

import fixtures
from ssbctl.cli.app import main
from ssbctl.data.download import Source, download, extract
from ssbctl.data.store import FeatureStore
from ssbctl.errors import DataError


class _Server:
    """Serves ``files``; a path in ``breaks`` has its first response cut off half-way."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.breaks: set[str] = set()
        self.ranges: list[str | None] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                data = server.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                header = self.headers.get("Range")
                server.ranges.append(header)
                start = int(header.split("=")[1].split("-")[0]) if header else 0
                if start >= len(data):
                    self.send_error(416)
                    return
                self.send_response(206 if header else 200)
                if header:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                body = data[start:]
                if self.path in server.breaks:
                    server.breaks.discard(self.path)
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(2)  # the connection drops mid-transfer
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "_Server":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[_Server]:
    with _Server() as s:
        yield s


def test_broken_connection_resumes_with_range(server: _Server, tmp_path: Path) -> None:
    data = bytes(range(256)) * 4096  # 1 MiB
    server.files["/big.bin"] = data
    server.breaks.add("/big.bin")
    path = download(Source(f"{server.url}/big.bin", hashlib.sha256(data).hexdigest()), tmp_path)
    assert path.read_bytes() == data and not (tmp_path / "big.bin.part").exists()
    assert server.ranges[0] is None and server.ranges[1] is not None and server.ranges[1].startswith("bytes=")
    assert int(server.ranges[1].split("=")[1].rstrip("-")) > 0, "the second request continues, not restarts"


def test_wrong_checksum_fails_and_removes_the_file(server: _Server, tmp_path: Path) -> None:
    server.files["/a.bin"] = b"payload" * 100
    with pytest.raises(DataError, match="SHA-256 is .* expected 0000"):
        download(Source(f"{server.url}/a.bin", "0" * 64), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_missing_file_is_a_clear_error(server: _Server, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="HTTP 404"):
        download(Source(f"{server.url}/nope.zip"), tmp_path)


def _tar(members: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return buf.getvalue()


@pytest.mark.parametrize("members, links, needle", [
    ({"ok.txt": b"x", "../evil.txt": b"x"}, None, "'../evil.txt' would be written outside"),
    ({"/tmp/ssbctl-evil.txt": b"x"}, None, "would be written outside"),
    ({"data/a.txt": b"x"}, {"data/link": "/etc/passwd"}, "points outside"),
    ({"data/a.txt": b"x"}, {"data/link": "../../outside"}, "points outside"),
])
def test_hostile_archives_are_refused_before_anything_is_written(tmp_path: Path, members: dict, links: dict | None,
                                                                   needle: str) -> None:
    archive = tmp_path / "evil.tar.gz"
    archive.write_bytes(_tar(members, links))
    target = tmp_path / "target"
    with pytest.raises(DataError, match=needle):
        extract(archive, target)
    assert not any(target.rglob("*")) and not (tmp_path / "evil.txt").exists()
    assert not Path("/tmp/ssbctl-evil.txt").exists()


def test_prepare_download_end_to_end(server: _Server, tmp_path: Path, capsys) -> None:
    layout = fixtures.msvd(tmp_path / "layout", per_split=1)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(layout, arcname="msvd")
    server.files["/msvd.tar"] = buf.getvalue()
    server.breaks.add("/msvd.tar")
    root = tmp_path / "data"
    code = main(["prepare", "msvd", "--download", "--url", f"{server.url}/msvd.tar",
                 "--sha256", hashlib.sha256(buf.getvalue()).hexdigest(), "--root", str(root),
                 "--out", str(tmp_path / "out"), "--workers", "0", "--json"])
    assert code == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["merged"]
    store = FeatureStore(tmp_path / "out")
    assert store.manifest["counts"] == {"videos": 3, "captions": 6, "failures": 0}
    assert (root / "downloads" / "msvd.tar").is_file() and (root / "msvd" / "raw-captions.pkl").is_file()
    # a wrong checksum is exit code 1 with one line
    assert main(["prepare", "msvd", "--download", "--url", f"{server.url}/msvd.tar", "--sha256", "1" * 64,
                 "--root", str(tmp_path / "other")]) == 1
    assert "SHA-256" in capsys.readouterr().err
