"""Training as the library and the CLI run it: the engine's trainer with per-epoch validation.

The engine sits below the evaluation layer and takes its validation as an argument; this module,
above both, supplies :func:`ssbctl.evaluation.evaluate.evaluate_split`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ssbctl.config import Recipe
from ssbctl.engine.trainer import Reporter
from ssbctl.engine.trainer import train as train_engine
from ssbctl.evaluation.evaluate import evaluate_split


def train(recipe: Recipe, run_dir: Path, resume: bool = False,
          reporter: Reporter | None = None, source: str | None = None) -> dict[str, Any]:
    """Train ``recipe`` into ``run_dir`` (continuing its latest checkpoint with ``resume``),
    evaluating text-to-video and video-to-text retrieval on ``data.eval_split`` after every epoch.

    Under torchrun, the process group this call joins is left before it returns (or raises)."""
    return train_engine(recipe, run_dir, resume, reporter, evaluate=evaluate_split, source=source)
