"""Atomic file writes and JSON Lines: a crash never leaves a half-written file behind.

Also what keeps ``--out`` from losing data: :func:`check_output` lets a command replace only a
folder that ssbctl itself wrote as the same kind of output (store, index, run, demo), and
:func:`output_lock` keeps two commands from writing the same output at once.
"""

from __future__ import annotations

import errno
import fcntl
import fnmatch
import json
import os
import secrets
import shutil
import socket
import stat
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ssbctl.core.errors import UserError

if TYPE_CHECKING:
    import torch

def _create_temp(path: Path) -> tuple[int, str]:
    """Create and open a new, empty temp file beside ``path`` (``.NAME.RANDOM.tmp``).

    Created ``0666`` less the umask the process has *now*, as ``open()`` creates every other file,
    so colleagues read what ssbctl writes wherever the umask lets them (``tempfile.mkstemp``
    creates 0600). The umask is applied by the kernel: it is never read or changed here, which
    would race with other threads."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = str(path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temp name", str(path))


def apply_umask(path: Path) -> None:
    """Give ``path`` the mode a new file gets now (0666 less the process umask): for files that a
    library creates 0600 (safetensors), which colleagues sharing a run, store or index could not read.
    The mode is that of an empty probe file created (and removed) beside ``path``."""
    path = Path(path)
    fd, probe = _create_temp(path)
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
    finally:
        os.close(fd)
        os.unlink(probe)
    os.chmod(path, mode)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temp file beside ``path``, fsync it, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _synced_temp(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _synced_temp(path: Path, data: bytes) -> str:
    """A temp file beside ``path`` holding ``data``, fsynced (removed again if writing fails)."""
    fd, tmp = _create_temp(path)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return tmp


def write_new_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` only if nothing is there: written to a temp file beside it, then
    hard-linked into place, which fails if ``path`` appeared meanwhile (FileExistsError) and never
    replaces anything. Like every write here, the file gets 0666 less the process umask."""
    path = Path(path)
    tmp = _synced_temp(path, data)
    try:
        os.link(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_user_file(path: Path, data: bytes) -> None:
    """Atomically write a file the user named (a picture): a place that cannot be written (a
    read-only or pseudo file system, a parent that is a file) is a UserError naming it."""
    try:
        atomic_write_bytes(path, data)
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write a safetensors file atomically (temp file, fsync, rename) with the usual file mode.

    safetensors itself creates its files 0600, unreadable to colleagues sharing a store or an
    index; like :func:`atomic_write_bytes`, the file gets ``0666`` less the process umask."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    try:
        save_file(tensors, str(tmp))
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        apply_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
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


def output_path(path: Path) -> Path:
    """An output path as every writer should use it: absolute (``--out .`` names the current
    folder by its name, so scratch folders go beside it, not inside), and a symlink to a folder
    followed to its target (the output is written where the link points; the link stays).

    Not ``resolve()``: links higher up the path are kept as the user typed them."""
    path = Path(os.path.abspath(Path(path).expanduser()))
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def _remove(path: Path) -> None:
    """Remove whatever is at ``path``: a folder with its contents, or a file or link (not its target)."""
    if os.path.islink(path) or (os.path.lexists(path) and not os.path.isdir(path)):
        os.unlink(path)
    else:
        shutil.rmtree(path, ignore_errors=True)


def fresh_dir(path: Path) -> Path:
    """An empty folder at ``path`` (whatever an earlier, interrupted write left there is removed)."""
    path = Path(os.path.abspath(path))
    _remove(path)
    path.mkdir(parents=True)
    return path


def replace_dir(tmp: Path, final: Path, kind: str | None = None) -> None:
    """Move a completely written folder into place; a previous ``final`` is removed only after.

    Readers see the old folder or the new one, never a half-written one. With ``kind`` (a
    user-facing output: ``store``, ``index``), ``final`` must pass :func:`check_output` and the
    new folder is marked as that kind; without it (a folder inside a run) it is replaced as is."""
    tmp, final = Path(os.path.abspath(tmp)), Path(os.path.abspath(final))
    if kind is not None:
        check_output(final, kind)
        mark_kind(tmp, kind)
    old = final.parent / f".{final.name}.old"
    _remove(old)
    if os.path.lexists(final):
        final.rename(old)
    tmp.rename(final)
    _remove(old)


# ---------------------------------------------------------------- what an output folder is

KIND_FILE = ".ssbctl-kind"  # one word, written into every output folder: what ssbctl wrote there
KIND_NAMES = {"store": "a prepared-data store", "index": "an index", "run": "a run folder", "demo": "a demo folder"}


# What a kind that replaces its folder whole writes there (older versions included): anything
# else in such a folder is not ssbctl's, and replacing the folder would delete it. Runs and demos
# are written into, never replaced whole, so they have no such list.
KIND_WRITES: dict[str, tuple[str, ...]] = {
    "store": ("manifest.json", "videos.jsonl", "captions.jsonl", "failures.jsonl", "features-*.safetensors"),
    "index": ("index.json", "embeddings.safetensors", "videos.jsonl", "failures.jsonl", "thumbs", "faiss*"),
}
# ssbctl's own marks and scratch in any output: the kind mark, atomic-write temp files, locks of
# outputs inside, leftovers of an interrupted replace.
_SCRATCH = (KIND_FILE, ".*.tmp", ".*.lock", ".*.old", ".*.writing")


def _read_small(path: Path, limit: int) -> str | None:
    """The text of ``path`` if it is a regular file (a FIFO or a device never is: reading it
    could block or never end), at most ``limit`` bytes; None when it cannot be read."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None
        with open(path, "rb") as fh:
            return fh.read(limit).decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _json_keys(path: Path, keys: tuple[str, ...]) -> bool:
    text = _read_small(path, 64 << 20)
    try:
        doc = json.loads(text) if text is not None else None
    except ValueError:
        return False
    return isinstance(doc, dict) and all(k in doc for k in keys)


def _legacy_demo(folder: Path) -> bool:
    names = {p.name for p in folder.iterdir() if not p.name.startswith(".")}
    return (folder / "raw" / "spec.json").is_file() and names <= {"raw", "data", "run"}


def _legacy_run(folder: Path) -> bool:
    text = _read_small(folder / "recipe.toml", 256)
    return text is not None and text.startswith("# Resolved recipe of this run")


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
    mark = (_read_small(folder / KIND_FILE, 64) or "").strip()
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
        _check_foreign(path, kind, what)
        return
    if found:
        raise UserError(f"{path} holds {KIND_NAMES.get(found, found)}, not {what}; nothing was changed "
                        f"(choose another --out)")
    raise UserError(f"{path} is not empty and is not {what} written by ssbctl; nothing was changed "
                    f"(choose a new or empty folder)")


def _check_foreign(path: Path, kind: str, what: str) -> None:
    """Refuse to replace a folder of ``kind`` that holds an entry ssbctl never writes there (the
    user's notes, an index built inside a store): replacing the folder would delete it."""
    patterns = KIND_WRITES.get(kind)
    if patterns is None:
        return
    for entry in sorted(p.name for p in path.iterdir()):
        if not any(fnmatch.fnmatchcase(entry, pattern) for pattern in (*patterns, *_SCRATCH)):
            raise UserError(f"{path} is {what} but also holds {entry}, which ssbctl did not write; "
                            f"replacing it would delete that, so nothing was changed (move {entry} "
                            f"out, or choose another --out)")


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
    """Open, lock and fill in ``lock``; the open descriptor holds the lock until closed.

    A lock that cannot be created (the output's parent is a file, a read-only or pseudo file
    system) means the output cannot be written: a UserError naming it."""
    while True:
        try:
            lock.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)  # less the umask
        except OSError as exc:
            reason = ("a part of that path is a file, not a folder" if exc.errno in (errno.EEXIST, errno.ENOTDIR)
                      else exc.strerror or str(exc))
            raise UserError(f"cannot write {target}: {reason}") from None
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
