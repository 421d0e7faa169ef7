"""Decoding in worker processes: a decoder that crashes or hangs on a bad file costs that one
video (recorded as a failure), never the whole prepare. Workers also decode in parallel with
the backbone running in the main process. They are fresh interpreters running
``ssbctl.data.decode_worker`` (no fork of a process holding torch's threads, and no re-import
of the parent's main module)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import asdict
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from ssbctl.data.video import DecodeError, Sampling, read_frames

Job = tuple[int, Path]  # (key, path)
Result = tuple[int, np.ndarray | None, str | None]  # (key, frames or None, failure reason or None)


def load_features_file(path: Path) -> np.ndarray:
    """A pre-extracted ``(T, dim)`` feature file (``.npy`` or ``.safetensors`` with one tensor)."""
    path = Path(path)
    if not path.is_file():
        raise DecodeError("missing file")
    try:
        if path.suffix == ".npy":
            array = np.load(path, allow_pickle=False)
        else:
            from safetensors.numpy import load_file

            tensors = load_file(str(path))
            if len(tensors) != 1:
                raise DecodeError(f"expected one tensor, found {len(tensors)}")
            array = next(iter(tensors.values()))
    except (ValueError, OSError) as exc:
        raise DecodeError(f"unreadable feature file: {exc}") from None
    if array.ndim != 2 or array.shape[0] == 0:
        raise DecodeError(f"expected a (frames, dim) array, got shape {array.shape}")
    return np.asarray(array, dtype=np.float32)


def decode_job(path: Path, sampling: dict[str, Any], features: bool) -> np.ndarray:
    """What a worker does with one path: decode the sampled frames, or load the feature file."""
    return load_features_file(path) if features else read_frames(path, Sampling(**sampling))


Work = Callable[[Path, dict[str, Any], bool], np.ndarray]


class _Slot:
    """One worker process (``python -m ssbctl.data.decode_worker``) and the job it is working on."""

    def __init__(self, work: Work, sampling: dict[str, Any], features: bool) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self.proc = subprocess.Popen([sys.executable, "-m", "ssbctl.data.decode_worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=env)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.send_conn = Connection(os.dup(self.proc.stdin.fileno()), readable=False)
        self.conn = Connection(os.dup(self.proc.stdout.fileno()), writable=False)
        self.proc.stdin.close()
        self.proc.stdout.close()
        self.send_conn.send((f"{work.__module__}:{work.__qualname__}", sampling, features))
        self.job: Job | None = None
        self.started = 0.0

    def give(self, job: Job) -> None:
        self.job, self.started = job, time.monotonic()
        self.send_conn.send(job)

    def exit_code(self) -> int | None:
        try:
            return self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        for conn in (self.conn, self.send_conn):
            try:
                conn.close()
            except OSError:
                pass


class DecodePool:
    """Decodes (or loads pre-extracted features) with ``workers`` processes; 0 means in-process.

    ``work`` must be a module-level function (the workers import it by name)."""

    def __init__(self, sampling: Sampling, workers: int = 2, timeout: float = 300.0, features: bool = False,
                 work: Work = decode_job) -> None:
        self.sampling, self.workers, self.timeout, self.features = asdict(sampling), workers, timeout, features
        self.work = work

    def map(self, jobs: Iterable[Job]) -> Iterator[Result]:
        """Results in completion order."""
        if self.workers == 0:
            for key, path in jobs:
                try:
                    yield key, self.work(path, self.sampling, self.features), None
                except DecodeError as exc:
                    yield key, None, str(exc)
            return
        queue = list(jobs)[::-1]
        slots = [_Slot(self.work, self.sampling, self.features) for _ in range(min(self.workers, len(queue)))]
        try:
            for slot in slots:
                if queue:
                    slot.give(queue.pop())
            while any(s.job is not None for s in slots):
                busy = {s.conn: s for s in slots if s.job is not None}
                for conn in wait(list(busy), timeout=1.0):
                    yield self._collect(busy[conn], slots, queue)
                yield from self._expire(slots, queue)
        finally:
            for slot in slots:
                slot.kill()

    def _collect(self, slot: _Slot, slots: list[_Slot], queue: list[Job]) -> Result:
        assert slot.job is not None
        key = slot.job[0]
        try:
            result = slot.conn.recv()
        except (EOFError, ConnectionError, OSError):
            result = (key, None, f"decoder crashed (exit code {slot.exit_code()})")
            self._replace(slot, slots)
            slot = slots[-1]
        slot.job = None
        if queue:
            slot.give(queue.pop())
        return result

    def _expire(self, slots: list[_Slot], queue: list[Job]) -> Iterator[Result]:
        now = time.monotonic()
        for slot in list(slots):
            if slot.job is not None and now - slot.started > self.timeout:
                key = slot.job[0]
                self._replace(slot, slots)
                if queue:
                    slots[-1].give(queue.pop())
                yield key, None, f"decode timed out after {self.timeout:.0f} s"

    def _replace(self, slot: _Slot, slots: list[_Slot]) -> None:
        slot.kill()
        slots.remove(slot)
        slots.append(_Slot(self.work, self.sampling, self.features))
