"""ssbctl: Support-Set Bottlenecks for video-text retrieval.

Library use (no Typer or rich needed)::

    import ssbctl
    run = ssbctl.load("runs/shapes")            # model, tokenizer, recipe of a trained run
    index = ssbctl.Index.load("~/.cache/ssbctl/index")  # a saved index (the demo's, by default)
    query = run.encode_text("a man cooks")      # one string: one embedding (D,); a list: (N, D)
    hits = index.search(query, k=5)             # a 1-D query: its hits; (Q, D): one list per query
    clip = run.encode_video("clip.mp4")         # one path (str or Path): (D,); a list of paths: (N, D)
    from ssbctl.objective.losses import infonce_loss
    from ssbctl.evaluation import retrieval_metrics
"""

from __future__ import annotations

from importlib import metadata
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what the lazy names below are, for type checkers and IDEs
    from ssbctl.config import load_recipe
    from ssbctl.inference.run import load_run as load
    from ssbctl.model import SSBModel
    from ssbctl.retrieval import Index

__all__ = ["Index", "SSBModel", "__version__", "load", "load_recipe"]


def _version() -> str:
    """The installed distribution's version: pyproject.toml is the one source."""
    try:
        return metadata.version("ssbctl")
    except metadata.PackageNotFoundError:  # a source tree on sys.path without installed metadata
        return "0+unknown"


__version__ = _version()


def __getattr__(name: str) -> Any:
    # Lazy so that `ssbctl --help` does not pay for importing torch and transformers.
    if name == "load":
        from ssbctl.inference.run import load_run

        return load_run
    if name == "Index":
        from ssbctl.retrieval import Index

        return Index
    if name == "SSBModel":
        from ssbctl.model import SSBModel

        return SSBModel
    if name == "load_recipe":
        from ssbctl.config import load_recipe

        return load_recipe
    raise AttributeError(f"module 'ssbctl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
