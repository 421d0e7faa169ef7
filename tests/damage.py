"""Shared by the bad-input tests: a tiny trained run and its index (built once per session),
private copies to damage, ways to damage files, and running the CLI with its stderr captured.

The CLI runs in-process through ``ssbctl.cli.app.main`` (what the console script calls), under
an alarm so that a hang fails the test instead of stalling it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import random
import shutil
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ssbctl.cli.app import main

from conftest import tiny_overrides


@dataclass(frozen=True)
class Tiny:
    """Pristine artefacts: a prepared store, a trained run (4 steps) and an index of it."""

    store: Path
    run: Path
    index: Path
    text_model: Path


def build_tiny(factory: pytest.TempPathFactory, store: Path, text_model: Path) -> Tiny:
    """Train and index once per session (every test module that asks shares the folder)."""
    root = factory.getbasetemp() / "bad-input-tiny"
    tiny = Tiny(store, root / "run", root / "index", text_model)
    if (tiny.index / "index.json").is_file():
        return tiny
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir()
    sets = tiny_overrides(store, text_model, tiny.run, **{"train.max_steps": 4, "data.eval_split": ""})
    argv = ["train", "--recipe", "shapes", "--out", str(tiny.run)]
    for item in sets:
        argv += ["--set", item]
    with redirect() as (_, err):
        assert main(argv) == 0, err.getvalue()
        assert main(["index", str(tiny.run), "--out", str(tiny.index), "--split", "test"]) == 0, err.getvalue()
    return tiny


@contextlib.contextmanager
def redirect() -> Iterator[tuple[io.StringIO, io.StringIO]]:
    """Capture stdout and stderr (rich consoles write to whatever sys.stdout/sys.stderr is)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        yield out, err


class Hang(BaseException):
    """Raised by the alarm: a BaseException, so the CLI's last-resort handler cannot swallow it."""


@dataclass
class Result:
    code: int
    out: str
    err: str


def cli(argv: list[str], timeout: int = 120) -> Result:
    """Run ``ssbctl ARGV`` in-process; fail (Hang) if it runs longer than ``timeout`` seconds."""

    def alarm(_signum: int, _frame: object) -> None:
        raise Hang(f"ssbctl {' '.join(argv)} ran over {timeout} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(timeout)
    try:
        with redirect() as (out, err):
            code = main([str(a) for a in argv])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    return Result(code, out.getvalue(), err.getvalue())


def assert_one_error_line(result: Result, code: int, *expect: str) -> str:
    """Exit ``code``, exactly one ``error:`` line on stderr naming ``expect``, no traceback, and not
    the last-resort handler (the loader that reads the file must have caught it)."""
    lines = [line for line in result.err.splitlines() if line.startswith("error:")]
    assert result.code == code, f"exit {result.code}, expected {code}; stderr:\n{result.err}"
    assert len(lines) == 1, f"expected one error line, got:\n{result.err}"
    assert "Traceback" not in result.err and "internal error" not in lines[0], result.err
    for text in expect:
        assert text in lines[0], f"{text!r} not in {lines[0]!r}"
    return lines[0]


def copy(src: Path, dst: Path) -> Path:
    """A private copy of a folder (symlinks copied as links)."""
    shutil.copytree(src, dst, symlinks=True)
    return dst


def index_for_run(index: Path, run: Path, dst: Path) -> Path:
    """A copy of ``index`` that names ``run`` as its run (to pair an index with a damaged run)."""
    copy(index, dst)
    meta = json.loads((dst / "index.json").read_text())
    (dst / "index.json").write_text(json.dumps({**meta, "run": str(run.resolve())}))
    return dst


def checkpoint_of(run: Path) -> Path:
    return sorted((run / "checkpoints").glob("step-*"))[-1]


def hashes(*folders: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folders`` (the input files a command must leave alone)."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for folder in folders for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


# ---------------------------------------------------------------- ways to damage a file


def truncate(path: Path, rng: random.Random) -> str:
    data = path.read_bytes()
    cut = rng.randrange(0, max(1, len(data)))
    path.write_bytes(data[:cut])
    return f"truncate to {cut} of {len(data)} bytes"


def flip(path: Path, rng: random.Random) -> str:
    """Flip bytes, most of them in the first kilobyte (headers, JSON keys: where parsers look)."""
    data = bytearray(path.read_bytes())
    if not data:
        return "empty: nothing to flip"
    spots = []
    for _ in range(rng.randint(1, 4)):
        end = min(len(data), 1024) if rng.random() < 0.7 else len(data)
        spot = rng.randrange(end)
        data[spot] ^= 1 << rng.randrange(8)
        spots.append(spot)
    path.write_bytes(bytes(data))
    return f"flip bytes at {spots}"


def drop_key(path: Path, rng: random.Random) -> str:
    """Remove one key somewhere in a JSON document or in one row of a JSON Lines file."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        if not rows:
            return "no rows"
        row = rng.randrange(len(rows))
        what = _drop_in(rows[row], rng)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return f"row {row + 1}: drop {what}"
    doc = json.loads(text)
    what = _drop_in(doc, rng)
    path.write_text(json.dumps(doc))
    return f"drop {what}"


def _drop_in(node: object, rng: random.Random) -> str:
    """Delete a random key of ``node`` or, one level down in three cases of four, of a child object."""
    if isinstance(node, list):
        objects = [n for n in node if isinstance(n, dict)]
        return _drop_in(rng.choice(objects), rng) if objects else "nothing"
    if not isinstance(node, dict) or not node:
        return "nothing"
    key = rng.choice(sorted(node))
    if isinstance(node[key], (dict, list)) and node[key] and rng.random() < 0.75:
        return f"{key}." + _drop_in(node[key], rng)
    del node[key]
    return key


MUTATIONS = {"truncate": truncate, "flip": flip, "drop_key": drop_key}
