"""A decoding worker: ``python -m ssbctl.data.decode_worker``, started by :class:`DecodePool`.

It reads a setup message and then jobs from stdin and writes results to stdout, each framed and
pickled by ``multiprocessing.connection``. Started as a plain module it imports only numpy,
decord, PyAV and this package's decoding code, not whatever the parent process had imported.

A job is ``(key, path, decoders)``; a result is ``(key, value, reason, retire)``, where
``retire`` asks the pool for a fresh worker (decord raised in this process).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any


def resolve(name: str) -> Callable[..., Any]:
    """A function from ``"module:qualname"``."""
    module, _, attr = name.partition(":")
    return getattr(importlib.import_module(module), attr)


def main() -> None:
    from ssbctl.data.video import DecodeError

    results_fd = os.dup(1)
    os.dup2(2, 1)  # anything a library prints goes to stderr, never into the result channel
    jobs, results = Connection(0, writable=False), Connection(results_fd, readable=False)
    work_name, sampling, features = jobs.recv()
    work = resolve(work_name)
    while True:
        try:
            job = jobs.recv()
        except EOFError:
            return
        if job is None:
            return
        key, path, decoders = job
        try:
            value = work(path, sampling, features, *([decoders] if decoders else []))
        except DecodeError as exc:
            results.send((key, None, str(exc), "decord" in exc.tried))
        except Exception as exc:  # noqa: BLE001 - any decoder failure is this video's failure
            results.send((key, None, f"decode error: {type(exc).__name__}: {str(exc)[:200]}", True))
        else:
            results.send((key, value, None, getattr(value, "fallback_reason", None) is not None))


if __name__ == "__main__":
    main()
