"""Downloads against a local HTTP server on 127.0.0.1: resume after a broken connection, checksum,
safe extraction, and `prepare --download` end to end."""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from ssbctl.cli.app import main
from ssbctl.core.errors import DataError
from ssbctl.data.download import Source, download, extract
from ssbctl.data.store import FeatureStore

import fixtures


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

            def do_GET(self) -> None:
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

    def __enter__(self) -> _Server:
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
                 "--out", str(tmp_path / "out"), "--backbone", "pixels", "--workers", "0", "--json"])
    assert code == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["merged"]
    store = FeatureStore(tmp_path / "out")
    assert store.manifest["counts"] == {"videos": 3, "captions": 6, "failures": 0}
    assert (root / "downloads" / "msvd.tar").is_file() and (root / "msvd" / "raw-captions.pkl").is_file()
    # a wrong checksum is exit code 1 with one line
    assert main(["prepare", "msvd", "--download", "--url", f"{server.url}/msvd.tar", "--sha256", "1" * 64,
                 "--root", str(tmp_path / "other")]) == 1
    assert "SHA-256" in capsys.readouterr().err


# ---------------------------------------------------------------- hostile archives (issue 17) and options


def _cve_2025_4517_tar(dest: Path) -> bytes:
    """The CVE-2025-4517 archive (CPython's test_realpath_limit_attack): a symlink chain too long
    for os.path.realpath makes ``escape`` point to DEST/.. unnoticed, a hard link through it
    reaches DEST/../flag, writing the hard link's name overwrites that file, and
    ``escape/newfile`` creates a file beside DEST."""
    steps = "abcdefghijklmnop"
    component = "d" * ((os.pathconf(dest.parent, "PC_PATH_MAX") - len(str(dest)) - 1) // (len(steps) + 1))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        def add(name: str, kind: bytes = tarfile.REGTYPE, link: str = "", data: bytes = b"") -> None:
            info = tarfile.TarInfo(name)
            info.type, info.linkname, info.size = kind, link, len(data)
            info.mode = 0o777 if kind == tarfile.DIRTYPE else 0o644
            tar.addfile(info, io.BytesIO(data))
        path = ""
        for step in steps:
            add(os.path.join(path, component), tarfile.DIRTYPE)
            add(os.path.join(path, step), tarfile.SYMTYPE, component)
            path = os.path.join(path, component)
        linkpath = os.path.join(*steps, "l" * 254)
        add(linkpath, tarfile.SYMTYPE, os.path.join(*[".."] * len(steps)))
        add("escape", tarfile.SYMTYPE, os.path.join(linkpath, ".."))
        add("flaglink", tarfile.LNKTYPE, os.path.join("escape", "flag"))
        add("flaglink", data=b"overwrite")
        add("escape/newfile", data=b"new")
    return buf.getvalue()


def _snapshot(folder: Path, skip: Path) -> dict[str, bytes | str]:
    """Every path under ``folder`` but ``skip``: file contents, link targets, folders."""
    out: dict[str, bytes | str] = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if Path(dirpath, d) != skip]
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            out[str(p)] = os.readlink(p) if p.is_symlink() else p.read_bytes() if p.is_file() else "dir"
    return out


def test_cve_2025_4517_archive_writes_nothing_outside_root(server: _Server, tmp_path: Path, capsys) -> None:
    root = tmp_path / "root"
    (tmp_path / "flag").write_text("original")
    server.files["/evil.tar"] = _cve_2025_4517_tar(root)
    before = _snapshot(tmp_path, root)
    code = main(["prepare", "msvd", "--download", "--url", f"{server.url}/evil.tar", "--root", str(root)])
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # after the download's progress bar
    assert code == 1 and last.startswith("error: evil.tar: ") and err.count("error:") == 1, err
    assert "symbolic link" in last and last.endswith("refused") and "Traceback" not in err
    assert _snapshot(tmp_path, root) == before
    assert (tmp_path / "flag").read_text() == "original" and not (tmp_path / "newfile").exists()
    assert sorted(p.name for p in root.iterdir()) == ["downloads"], "nothing extracted, no temp folder left"


def _tar_of(entries: list[tuple[str, bytes, str, bytes]]) -> bytes:
    """A tar of (name, type, linkname, data) entries, in that order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, kind, link, data in entries:
            info = tarfile.TarInfo(name)
            info.type, info.linkname, info.size = kind, link, len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("entries, needle", [
    ([("d/x", tarfile.REGTYPE, "", b"x"), ("link", tarfile.SYMTYPE, "d/x", b""),
      ("link/y", tarfile.REGTYPE, "", b"y")], "passes through the symbolic link 'link'"),
    ([("d/x", tarfile.REGTYPE, "", b"x"), ("link", tarfile.SYMTYPE, "d", b"")], "does not point to a file"),
    ([("link", tarfile.SYMTYPE, "d/../x", b""), ("x", tarfile.REGTYPE, "", b"x")], "points outside"),
    ([("hard", tarfile.LNKTYPE, "later", b""), ("later", tarfile.REGTYPE, "", b"x")],
     "does not name an earlier file"),
    ([("x", tarfile.REGTYPE, "", b"x"), ("x/y", tarfile.REGTYPE, "", b"y")], "uses the file 'x' as a folder"),
])
def test_links_that_could_lead_elsewhere_are_refused(tmp_path: Path, entries: list, needle: str) -> None:
    archive = tmp_path / "links.tar"
    archive.write_bytes(_tar_of(entries))
    target = tmp_path / "target"
    with pytest.raises(DataError, match=needle):
        extract(archive, target)
    assert list(target.iterdir()) == []


def test_links_inside_the_archive_still_work(tmp_path: Path) -> None:
    archive = tmp_path / "ok.tar"
    archive.write_bytes(_tar_of([("./", tarfile.DIRTYPE, "", b""), ("d/a.txt", tarfile.REGTYPE, "", b"aaa"),
                                 ("d/same.txt", tarfile.LNKTYPE, "d/a.txt", b""),
                                 ("d/sym.txt", tarfile.SYMTYPE, "a.txt", b""),
                                 ("d/a.txt", tarfile.REGTYPE, "", b"new")]))
    target = tmp_path / "target"
    (target / "d").mkdir(parents=True)
    (target / "d" / "mine.txt").write_text("kept")
    extract(archive, target)
    assert (target / "d" / "a.txt").read_bytes() == b"new", "a repeated name: the later member wins"
    assert (target / "d" / "same.txt").read_bytes() == b"aaa" and (target / "d" / "sym.txt").read_bytes() == b"new"
    assert os.readlink(target / "d" / "sym.txt") == "a.txt" and (target / "d" / "mine.txt").read_text() == "kept"
    assert sorted(p.name for p in target.iterdir()) == ["d"]


def test_zip_symlinks_and_zip_slip_are_refused(tmp_path: Path) -> None:
    target = tmp_path / "target"
    link = zipfile.ZipInfo("data/link")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    for name, info, needle in [("link.zip", link, "is a symbolic link"),
                               ("slip.zip", zipfile.ZipInfo("../slip.txt"), "would be written outside")]:
        with zipfile.ZipFile(tmp_path / name, "w") as zf:
            zf.writestr("data/ok.txt", "ok")
            zf.writestr(info, "/etc/passwd")
        with pytest.raises(DataError, match=needle):
            extract(tmp_path / name, target)
        assert list(target.iterdir()) == [] and not (tmp_path / "slip.txt").exists()


def test_zip_whose_header_understates_a_size_is_a_data_error(tmp_path: Path) -> None:
    archive = tmp_path / "liar.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("big.bin", b"x" * 100_000)
    raw = bytearray(archive.read_bytes())
    central = raw.index(b"PK\x01\x02")
    raw[central + 24: central + 28] = (10).to_bytes(4, "little")  # uncompressed size: 10 bytes
    archive.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="liar.zip: cannot read the archive"):
        extract(archive, tmp_path / "target")
    assert list((tmp_path / "target").iterdir()) == []


def test_archive_bomb_is_refused_by_default(tmp_path: Path) -> None:
    archive = tmp_path / "bomb.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("zeros.bin")
        info.size = 100 << 20
        tar.addfile(info, io.BytesIO(bytes(info.size)))
    assert archive.stat().st_size < 1 << 20
    with pytest.raises(DataError, match="expands to 104857600 bytes, .* times its size"):
        extract(archive, tmp_path / "target")
    assert list((tmp_path / "target").iterdir()) == []


def test_extraction_limits_from_flag_and_environment(server: _Server, tmp_path: Path, capsys, monkeypatch) -> None:
    server.files["/many.tar"] = _tar_of([(f"f{i}.txt", tarfile.REGTYPE, "", b"x" * 1000) for i in range(8)])
    args = ["prepare", "msvd", "--download", "--url", f"{server.url}/many.tar"]
    assert main([*args, "--root", str(tmp_path / "a"), "--max-extract-bytes", "4K"]) == 1
    err = capsys.readouterr().err
    assert "many.tar: its headers announce more than 4096 bytes" in err and "--max-extract-bytes" in err
    monkeypatch.setenv("SSBCTL_MAX_EXTRACT_MEMBERS", "5")
    assert main([*args, "--root", str(tmp_path / "b")]) == 1
    assert "more than 5 members" in capsys.readouterr().err
    assert not (tmp_path / "a" / "f0.txt").exists() and not (tmp_path / "b" / "f0.txt").exists()
    assert main([*args, "--root", str(tmp_path / "c"), "--max-extract-bytes", "lots"]) == 2
    assert "--max-extract-bytes must be a positive byte count" in capsys.readouterr().err


def test_upper_case_sha256_is_not_downloaded_again(server: _Server, tmp_path: Path) -> None:
    data = b"payload" * 100
    server.files["/a.bin"] = data
    digest = hashlib.sha256(data).hexdigest().upper()
    for _ in range(2):
        assert download(Source(f"{server.url}/a.bin", digest), tmp_path).read_bytes() == data
    assert len(server.ranges) == 1, "the second run finds the checked file and fetches nothing"


@pytest.mark.parametrize("args, needle", [
    (["--download", "--url", "URL/a.bin", "--sha256", "abc"], "--sha256 must be 64 hexadecimal digits"),
    (["--url", "URL/a.bin"], "--url needs --download"),
    (["--download", "--url", "example.org/a.bin"], "--url needs a scheme"),
    (["--download", "--url", "URL/sub/.."], "--url must end in a file name"),
    (["--download", "--url", "URL/a.bin", "--url", "URL/b.bin", "--sha256", "0" * 64],
     "--sha256 goes with exactly one --url"),
])
def test_bad_download_options_fail_before_any_work(server: _Server, tmp_path: Path, capsys, args: list[str],
                                                   needle: str) -> None:
    server.files["/a.bin"] = server.files["/sub/.."] = b"payload"
    root = tmp_path / "root"
    fixtures.msvd(root, per_split=1)
    before = _snapshot(tmp_path, tmp_path / "none")
    code = main(["prepare", "msvd", "--root", str(root), "--out", str(tmp_path / "out"), "--workers", "0",
                 *[a.replace("URL", server.url) for a in args]])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"error: {needle}") and err.count("\n") == 1, err
    assert _snapshot(tmp_path, tmp_path / "none") == before and server.ranges == []
