"""Every file ssbctl writes gets the mode the process umask gives, like any other program's files.

Issue 12, "Files": index and feature files were written 0600 while every other file was 0644, so
colleagues on a shared machine could not read an index. The mode must follow the umask the
process has when it writes (not one read once at import), for every file: 022 -> 0644, 077 -> 0600.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from ssbctl.core.io import atomic_write_bytes, atomic_write_json, output_lock, save_tensors

from conftest import tiny_overrides

UMASKS = (0o022, 0o077)


@contextmanager
def _umask(mask: int) -> Iterator[None]:
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


@pytest.mark.parametrize("mask", UMASKS)
def test_atomic_writes_use_the_umask_of_the_moment(tmp_path: Path, mask: int) -> None:
    """The library's writers, called after the umask changed (ssbctl already imported, as in a
    notebook or a server that sets its umask late): the new umask decides, as for open()."""
    with _umask(mask):
        atomic_write_bytes(tmp_path / "a.bin", b"x")
        atomic_write_json(tmp_path / "a.json", {"a": 1})
        save_tensors(tmp_path / "t.safetensors", {"x": torch.zeros(2)})
        with output_lock(tmp_path / "out") as lock:
            lock_mode = _mode(lock)  # removed again when the lock is released
        (tmp_path / "plain.txt").write_text("reference")  # what open() gives under this umask
    expected = 0o666 & ~mask
    assert _mode(tmp_path / "plain.txt") == expected
    assert lock_mode == expected, f"lock file: {oct(lock_mode)}"
    for path in [tmp_path / "a.bin", tmp_path / "a.json", tmp_path / "t.safetensors"]:
        assert _mode(path) == expected, f"{path.name}: {oct(_mode(path))}, expected {oct(expected)} (umask {mask:03o})"
    assert not list(tmp_path.glob(".*.tmp")), "a temp file was left behind"


_PIPELINE = """
import sys
from ssbctl.cli.app import main
annotations, store, run, index, *overrides = sys.argv[1:]
sets = [x for o in overrides for x in ("--set", o)]
for argv in (["prepare", "custom", "--annotations", annotations, "--out", store, "--pixel-size", "8", "--frames", "4"],
             ["train", "--recipe", "shapes", "--out", run, *sets],
             ["index", run, "--out", index]):
    code = main(argv)
    if code:
        sys.exit(f"ssbctl {argv[0]} exited {code}")
"""


@pytest.mark.parametrize("mask", UMASKS)
def test_every_output_file_follows_the_umask(shapes_raw: Path, tiny_text_model: Path, tmp_path: Path,
                                             mask: int) -> None:
    """prepare, train and index in a process started under ``mask``: every file and folder they
    write (features, embeddings, thumbnails, checkpoints, metrics, locks) has the mode that
    umask gives: files 0666 less it, folders 0777 less it."""
    out = tmp_path / "out"
    out.mkdir()
    store, run, index = out / "store", out / "run", out / "index"
    overrides = [o for o in tiny_overrides(store, tiny_text_model, run, **{"train.epochs": 1})]
    proc = subprocess.run([sys.executable, "-c", _PIPELINE, str(shapes_raw / "captions.jsonl"), str(store),
                           str(run), str(index), *overrides],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          preexec_fn=lambda: os.umask(mask))
    assert proc.returncode == 0, proc.stderr[-3000:]
    wrong = []
    for path in [p for p in out.rglob("*")]:
        if path.is_symlink():
            continue
        expected = (0o777 if path.is_dir() else 0o666) & ~mask
        if _mode(path) != expected:
            wrong.append(f"{path.relative_to(out)}: {oct(_mode(path))}")
    checked = {p.name for p in out.rglob("*")}
    assert {"embeddings.safetensors", "model.safetensors", "metrics.jsonl", "index.json"} <= checked, checked
    assert any(name.startswith("features-") for name in checked), checked
    assert not wrong, f"under umask {mask:03o}, expected files {oct(0o666 & ~mask)}: " + ", ".join(wrong)
