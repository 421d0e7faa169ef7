"""Atomic file writes and JSON Lines: a crash never leaves a half-written file behind.

Also what keeps ``--out`` from losing data: :func:`check_output` lets a command replace only a
folder that ssbctl itself wrote as the same kind of output (store, index, run, demo), and
:func:`output_lock` keeps two commands from writing the same output at once.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from ssbctl.core.errors import UserError

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temp file beside ``path``, fsync it, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Atomically write UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    """Atomically write an indented JSON document."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def jsonl_text(rows: Iterable[dict[str, Any]]) -> str:
    """Rows as JSON Lines text."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """Rows of a JSON Lines file; a torn last line (from a crash mid-append) is ignored.

    A missing or non-UTF-8 file, a bad line before the last, or a line that is not a JSON object
    is a DataError naming the file and the line."""
    from ssbctl.core.errors import DataError

    try:
        with open(path, encoding="utf-8") as fh:
            lines = fh.readlines()
    except FileNotFoundError:
        raise DataError(f"{path} is missing") from None
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text (damaged?)") from None
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            if i == len(lines) - 1:
                return
            raise DataError(f"{path} line {i + 1}: invalid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path} line {i + 1}: expected a JSON object, got {type(row).__name__}")
        yield row


def append_jsonl(path: Path, row: dict[str, Any] | list[dict[str, Any]]) -> None:
    """Append one row (or several, with one sync) and flush to disk (logs that must survive a kill)."""
    rows = row if isinstance(row, list) else [row]
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(jsonl_text(rows))
        fh.flush()
        os.fsync(fh.fileno())


def fresh_dir(path: Path) -> Path:
    """An empty folder at ``path`` (whatever an earlier, interrupted write left there is removed)."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def replace_dir(tmp: Path, final: Path, kind: str | None = None) -> None:
    """Move a completely written folder into place; a previous ``final`` is removed only after.

    Readers see the old folder or the new one, never a half-written one. With ``kind`` (a
    user-facing output: ``store``, ``index``), ``final`` must pass :func:`check_output` and the
    new folder is marked as that kind; without it (a folder inside a run) it is replaced as is."""
    if kind is not None:
        check_output(final, kind)
        mark_kind(tmp, kind)
    old = final.parent / f".{final.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------- what an output folder is

KIND_FILE = ".ssbctl-kind"  # one word, written into every output folder: what ssbctl wrote there
KIND_NAMES = {"store": "a prepared-data store", "index": "an index", "run": "a run folder", "demo": "a demo folder"}


def _json_keys(path: Path, keys: tuple[str, ...]) -> bool:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and all(k in doc for k in keys)


def _legacy_demo(folder: Path) -> bool:
    names = {p.name for p in folder.iterdir() if not p.name.startswith(".")}
    return (folder / "raw" / "spec.json").is_file() and names <= {"raw", "data", "run"}


def _legacy_run(folder: Path) -> bool:
    try:
        with open(folder / "recipe.toml", encoding="utf-8") as fh:
            return fh.readline().startswith("# Resolved recipe of this run")
    except OSError:
        return False


# How to recognise what ssbctl wrote before it marked its folders with KIND_FILE.
_LEGACY: dict[str, Callable[[Path], bool]] = {
    "store": lambda f: _json_keys(f / "manifest.json", ("format_version", "backbone", "shards")),
    "index": lambda f: _json_keys(f / "index.json", ("format_version", "count", "dim")),
    "run": _legacy_run,
    "demo": _legacy_demo,
}


def folder_kind(folder: Path) -> str | None:
    """Which kind of ssbctl output ``folder`` holds (its mark, else its files), or None."""
    folder = Path(folder)
    try:
        mark = (folder / KIND_FILE).read_text(encoding="utf-8").strip()
    except OSError:
        mark = ""
    if mark:
        return mark
    return next((kind for kind, probe in _LEGACY.items() if probe(folder)), None)


def mark_kind(folder: Path, kind: str) -> None:
    """Mark ``folder`` as an output of ``kind``, so that only a later output of that kind replaces it."""
    atomic_write_text(Path(folder) / KIND_FILE, kind + "\n")


def check_output(path: Path, kind: str, inputs: Iterable[Path | None] = ()) -> None:
    """Refuse (UserError naming ``path``) to write an output of ``kind`` at ``path`` unless the
    path is free, an empty folder, or a folder ssbctl wrote as the same kind, and holds none of
    ``inputs``. Writers replace or write into ``path``; this is what keeps a mistyped ``--out``
    from deleting the user's files."""
    path = Path(path)
    what = KIND_NAMES.get(kind, kind)
    if not os.path.lexists(path):
        return
    if not path.is_dir():
        raise UserError(f"{path} exists and is not a folder; choose another --out for {what}")
    for source in inputs:
        if source is not None and _inside(Path(source), path):
            raise UserError(f"{path} contains the input {source}; choose an --out outside it")
    if not any(path.iterdir()):
        return
    found = folder_kind(path)
    if found == kind:
        return
    if found:
        raise UserError(f"{path} holds {KIND_NAMES.get(found, found)}, not {what}; nothing was changed "
                        f"(choose another --out)")
    raise UserError(f"{path} is not empty and is not {what} written by ssbctl; nothing was changed "
                    f"(choose a new or empty folder)")


def _inside(source: Path, folder: Path) -> bool:
    return source.resolve().is_relative_to(folder.resolve())


# ---------------------------------------------------------------- one writer per output

LOCKS_ENV = "SSBCTL_HELD_LOCKS"  # {lock path: pid}: locks a launcher holds for the processes it starts
_held: set[str] = set()  # locks this process holds (POSIX locks do not exclude their own process)


def lock_path(target: Path, tag: str = "") -> Path:
    """The lock file of the output ``target`` (beside it: the output itself may be swapped)."""
    target = Path(target).resolve()
    return target.parent / f".{target.name}{'.' + tag if tag else ''}.lock"


def _holder_text(fd: int) -> dict[str, Any]:
    try:
        doc = json.loads(os.pread(fd, 65536, 0).decode("utf-8") or "{}")
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "another ssbctl process"
    stamp = holder.get("since")
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp if isinstance(stamp, (int, float)) else 0))
    return f"pid {holder.get('pid')} on {holder.get('host')} since {since} ({holder.get('command', '?')})"


def _alive(holder: dict[str, Any]) -> bool:
    """Whether the process a lock file names may still run (unknown for another host: yes)."""
    if not isinstance(holder.get("pid"), int):
        return False
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _inherited(lock: Path) -> bool:
    """Whether a launcher that started this process holds ``lock`` for it (torchrun workers)."""
    try:
        held = json.loads(os.environ.get(LOCKS_ENV, "{}"))
    except ValueError:
        return False
    return isinstance(held, dict) and _alive({"pid": held.get(str(lock)), "host": socket.gethostname()})


def _acquire(lock: Path, target: Path) -> int:
    """Open, lock and fill in ``lock``; the open descriptor holds the lock until closed."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _holder_text(fd)
            # EAGAIN/EACCES: held. Anything else (ENOLCK: a file system without locks): held if
            # the file names a live process (this host) or any process of another host.
            if exc.errno in (errno.EAGAIN, errno.EACCES) or _alive(holder):
                os.close(fd)
                raise UserError(f"{target} is in use by {_describe(holder)}; wait for it to finish "
                                f"(lock: {lock})") from None
        try:
            current = os.stat(lock)
        except FileNotFoundError:
            current = None
        if current is None or not os.path.samestat(os.fstat(fd), current):
            os.close(fd)  # the holder released (and removed) it between our open and lock: again
            continue
        holder = _holder_text(fd)
        if holder.get("host") not in (None, socket.gethostname()):
            os.close(fd)  # a lock of another machine: its process may be alive (locks need not cross hosts)
            raise UserError(f"{target} is in use by {_describe(holder)}; if that process is gone, "
                            f"delete {lock}")
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
              "command": " ".join(["ssbctl", *sys.argv[1:]])[:300]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode("utf-8"), 0)
        os.fsync(fd)
        return fd


@contextmanager
def output_lock(target: Path, tag: str = "") -> Iterator[Path]:
    """Hold the exclusive lock of the output ``target`` (and optional ``tag``) for the block.

    A second ssbctl that wants the same output gets a UserError naming the holder. The lock is
    a POSIX record lock on ``.NAME.lock`` beside the output, which records the holder's pid, host
    and command: the kernel releases it when the holder exits in any way (a SIGKILLed holder
    leaves a file naming a dead pid, which the next command takes over). A lock named in
    ``$SSBCTL_HELD_LOCKS`` by a live launcher (``train --nproc``) is already held for this process."""
    lock = lock_path(target, tag)
    key = str(lock)
    if _inherited(lock):
        yield lock
        return
    if key in _held:
        raise UserError(f"{target} is already being written by this process")
    fd = _acquire(lock, Path(target))
    _held.add(key)
    try:
        yield lock
    finally:
        _held.discard(key)
        try:
            if os.path.samestat(os.fstat(fd), os.stat(lock)):
                lock.unlink()
        except FileNotFoundError:
            pass
        os.close(fd)


def lock_env(locks: Iterable[Path]) -> dict[str, str]:
    """Environment that tells child processes this process holds ``locks`` for them."""
    return {LOCKS_ENV: json.dumps({str(p): os.getpid() for p in locks})}
