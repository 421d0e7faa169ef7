"""Loading a pretrained model through `transformers` (a hub id or a local folder), one way for the
text encoder and the frame backbones: no progress bars, a local folder never reaches the network,
and a model that cannot be loaded is one UserError line, not a traceback."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from ssbctl.core.errors import UserError

T = TypeVar("T")


def load_pretrained(what: str, name: str, source: str, load: Callable[[bool], T]) -> T:
    """``load(local_files_only)`` for ``source``; its OSError or ValueError becomes
    ``UserError("cannot load {what} '{name}': ...")`` (``name``: as the user gave it)."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    try:
        return load(Path(source).is_dir())
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load {what} '{name}': {str(exc).splitlines()[0]}") from None
