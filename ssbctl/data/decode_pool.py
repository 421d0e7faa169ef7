"""Decoding in worker processes: a decoder that crashes or hangs on a bad file costs that one
video (recorded as a failure), never the whole prepare. Workers also decode in parallel with
the backbone running in the main process. They are fresh interpreters running
``ssbctl.data.decode_worker`` (no fork of a process holding torch's threads, and no re-import
of the parent's main module).

A video whose worker crashed or timed out is tried once more, in a fresh worker, with PyAV alone
(decord can abort on a file that FFmpeg reads). A worker in which decord raised is replaced after
that job: decord's failed checks may leave its process in a bad state."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, replace
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import numpy as np

from ssbctl.data.video import DECODERS, Decoded, DecodeError, Sampling, decode_video

Job = tuple[int, Path]  # (key, path)
Result = tuple[int, Decoded | None, str | None]  # (key, frames and their decoder or None, failure reason or None)
Task = tuple[int, Path, tuple[str, ...] | None]  # a job and the decoders to use (None: decord, then PyAV)
RETRY_DECODERS = ("pyav",)  # a video whose worker crashed or hung is tried once more with these


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


def decode_job(path: Path, sampling: dict[str, Any], features: bool,
               decoders: tuple[str, ...] | None = None) -> Decoded:
    """What a worker does with one path: decode the sampled frames (with ``decoders``; default
    decord, then PyAV), or load the feature file."""
    if features:
        return Decoded(load_features_file(path))
    return decode_video(path, Sampling(**sampling), decoders or DECODERS)


Work = Callable[..., Decoded]  # (path, sampling, features[, decoders]) -> Decoded


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
        self.job: Task | None = None
        self.started = 0.0

    def give(self, job: Task) -> None:
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
        self._first_failure: dict[int, str] = {}  # key -> why its first attempt failed, while it is retried

    def map(self, jobs: Iterable[Job]) -> Iterator[Result]:
        """Results in completion order."""
        if self.workers == 0:
            for key, path in jobs:
                try:
                    yield key, self.work(path, self.sampling, self.features), None
                except DecodeError as exc:
                    yield key, None, str(exc)
            return
        queue: list[Task] = [(key, path, None) for key, path in jobs]
        queue.reverse()  # popped from the end: in order
        slots = [_Slot(self.work, self.sampling, self.features) for _ in range(min(self.workers, len(queue)))]
        try:
            for slot in slots:
                if queue:
                    slot.give(queue.pop())
            while any(s.job is not None for s in slots):
                # Any: wait() types what it answers more widely than the Connections it is given.
                busy: dict[Any, _Slot] = {s.conn: s for s in slots if s.job is not None}
                for conn in wait(list(busy), timeout=1.0):
                    result = self._collect(busy[conn], slots, queue)
                    if result is not None:
                        yield result
                yield from self._expire(slots, queue)
        finally:
            for slot in slots:
                slot.kill()

    def _collect(self, slot: _Slot, slots: list[_Slot], queue: list[Task]) -> Result | None:
        """The result of ``slot``'s job (None when the job went back on the queue for a retry)."""
        task = slot.job
        assert task is not None
        try:
            key, value, reason, retire = slot.conn.recv()
        except (EOFError, ConnectionError, OSError):
            result = self._failed(task, f"decoder crashed (exit code {slot.exit_code()})", queue)
            retire = True
        else:
            result = self._finished(key, value, reason)
        if retire:
            self._replace(slot, slots)
            slot = slots[-1]
        slot.job = None
        if queue:
            slot.give(queue.pop())
        return result

    def _expire(self, slots: list[_Slot], queue: list[Task]) -> Iterator[Result]:
        now = time.monotonic()
        for slot in list(slots):
            if slot.job is not None and now - slot.started > self.timeout:
                task = slot.job
                self._replace(slot, slots)
                result = self._failed(task, f"decode timed out after {self.timeout:.0f} s", queue)
                if queue:
                    slots[-1].give(queue.pop())
                if result is not None:
                    yield result

    def _failed(self, task: Task, reason: str, queue: list[Task]) -> Result | None:
        """A job's worker crashed or hung: queue it again with PyAV alone, or, when that was the
        retry, its failure with both reasons."""
        key, path, decoders = task
        if decoders is None and not self.features:
            self._first_failure[key] = reason
            queue.append((key, path, RETRY_DECODERS))
            return None
        return self._finished(key, None, reason)

    def _finished(self, key: int, value: Decoded | None, reason: str | None) -> Result:
        """A job's result; a retried one also says why its first attempt failed."""
        first = self._first_failure.pop(key, None)
        if first is None:
            return key, value, reason
        retry = f"retried with {'+'.join(RETRY_DECODERS)}"
        if value is not None:
            why = "; ".join(r for r in (first, value.fallback_reason) if r)
            return key, replace(value, fallback_reason=f"{why} ({retry})"), None
        return key, None, f"{first}; {retry}: {reason}"

    def _replace(self, slot: _Slot, slots: list[_Slot]) -> None:
        slot.kill()
        slots.remove(slot)
        slots.append(_Slot(self.work, self.sampling, self.features))
