"""Reading the files ssbctl wrote (stores, runs, indexes) defensively.

Every reader turns a missing, truncated, non-UTF-8 or malformed file into a :class:`DataError`
(exit code 1) that names the file and, where it helps, the line and the key, so a damaged folder
is reported in one line instead of a traceback from deep inside a parser.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ssbctl.core.errors import DataError

# JSON types a field may have (bool is not an int here: True would pass for 1).
KINDS: dict[type, str] = {str: "a string", int: "an integer", float: "a number", dict: "an object",
                          list: "a list", bool: "true or false"}


def read_json(path: Path, kind: type = dict) -> Any:
    """The JSON document in ``path``, which must be of ``kind``; DataError naming the file otherwise."""
    path = Path(path)
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path} is missing") from None
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text (damaged?)") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON at line {exc.lineno} ({exc.msg})") from None
    if not is_kind(value, kind):
        raise DataError(f"{path}: expected {KINDS[kind]} at the top level, got {type(value).__name__}")
    return value


def is_kind(value: Any, kind: type) -> bool:
    """Whether a parsed JSON value is of ``kind`` (ints count as floats; bools never as numbers)."""
    if kind in (int, float) and isinstance(value, bool):
        return False
    if kind is float:
        return isinstance(value, (int, float))
    return isinstance(value, kind)


def field(obj: dict[str, Any], key: str, kind: type, where: str) -> Any:
    """``obj[key]``, which must exist and be of ``kind``; DataError naming ``where`` and the key."""
    if key not in obj:
        raise DataError(f"{where}: missing key '{key}'")
    value = obj[key]
    if not is_kind(value, kind):
        raise DataError(f"{where}: key '{key}' must be {KINDS[kind]}, got {value!r:.60}")
    return value


def check_rows(rows: list[dict[str, Any]], path: Path, fields: Mapping[str, type]) -> list[dict[str, Any]]:
    """Check that every row of a JSON Lines file has ``fields`` of the right kinds."""
    for n, row in enumerate(rows, 1):
        for key, kind in fields.items():
            field(row, key, kind, f"{path} row {n}")
    return rows


@contextmanager
def open_tensors(path: Path) -> Iterator[Any]:
    """A ``safe_open`` handle on a safetensors file; a missing or damaged file is a DataError."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} is missing")
    try:
        handle = safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, ValueError) as exc:
        raise DataError(f"{path} is damaged: {_first_line(exc)}") from None
    with handle as fh:
        yield _CheckedHandle(fh, path)


class _CheckedHandle:
    """``get_tensor`` that reports a missing or unreadable tensor as a DataError."""

    def __init__(self, fh: Any, path: Path) -> None:
        self.fh, self.path = fh, path

    def keys(self) -> list[str]:
        return list(self.fh.keys())

    def get_tensor(self, name: str) -> torch.Tensor:
        from safetensors import SafetensorError

        try:
            return self.fh.get_tensor(name)
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            if name not in self.fh.keys():
                raise DataError(f"{self.path} has no tensor '{name}'") from None
            raise DataError(f"{self.path} is damaged (tensor '{name}'): {_first_line(exc)}") from None


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file; a missing or damaged file is a DataError."""
    with open_tensors(path) as fh:
        return {name: fh.get_tensor(name) for name in fh.keys()}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
