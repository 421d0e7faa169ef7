"""ssbctl: Support-Set Bottlenecks for video-text retrieval.

Library use (no Typer or rich needed)::

    import ssbctl
    run = ssbctl.load("runs/shapes")            # model, tokenizer, recipe of a trained run
    from ssbctl.objective.losses import infonce_loss
    from ssbctl.evaluation import retrieval_metrics
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Lazy so that `ssbctl --help` does not pay for importing torch and transformers.
    if name == "load":
        from ssbctl.inference.run import load_run

        return load_run
    if name in ("Index", "SSBModel", "load_recipe"):
        from ssbctl.config import load_recipe
        from ssbctl.model import SSBModel
        from ssbctl.retrieval import Index

        return {"Index": Index, "SSBModel": SSBModel, "load_recipe": load_recipe}[name]
    raise AttributeError(f"module 'ssbctl' has no attribute {name!r}")
