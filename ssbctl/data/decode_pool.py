"""Decoding in worker processes: a decoder that crashes or hangs on a bad file costs that one
video (recorded as a failure), never the whole prepare. Workers also decode in parallel with
the backbone running in the main process."""

from __future__ import annotations

import multiprocessing as mp
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


def _worker(conn: Connection, work: Work, sampling: dict[str, Any], features: bool) -> None:
    while True:
        job = conn.recv()
        if job is None:
            return
        key, path = job
        try:
            conn.send((key, work(path, sampling, features), None))
        except DecodeError as exc:
            conn.send((key, None, str(exc)))
        except Exception as exc:  # noqa: BLE001 - any decoder failure is this video's failure
            conn.send((key, None, f"decode error: {type(exc).__name__}: {str(exc)[:200]}"))


class _Slot:
    """One worker process and the job it is working on."""

    def __init__(self, ctx: Any, work: Work, sampling: dict[str, Any], features: bool) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, work, sampling, features), daemon=True)
        self.proc.start()
        child.close()
        self.job: Job | None = None
        self.started = 0.0

    def give(self, job: Job) -> None:
        self.job, self.started = job, time.monotonic()
        self.conn.send(job)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join()
        self.conn.close()


class DecodePool:
    """Decodes (or loads pre-extracted features) with ``workers`` processes; 0 means in-process.

    ``work`` must be a module-level function (the spawned workers import it by name)."""

    def __init__(self, sampling: Sampling, workers: int = 2, timeout: float = 300.0, features: bool = False,
                 work: Work = decode_job) -> None:
        self.sampling, self.workers, self.timeout, self.features = asdict(sampling), workers, timeout, features
        self.work = work
        self.ctx = mp.get_context("spawn")  # no fork of a process that holds torch's threads

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
        slots = [_Slot(self.ctx, self.work, self.sampling, self.features) for _ in range(min(self.workers, len(queue)))]
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
            slot.proc.join(timeout=5)
            result = (key, None, f"decoder crashed (exit code {slot.proc.exitcode})")
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
        slots.append(_Slot(self.ctx, self.work, self.sampling, self.features))
