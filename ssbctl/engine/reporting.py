"""Where training numbers go besides ``metrics.jsonl``: plain progress lines and metric trackers.

- :class:`LineReporter`: one plain line every ``train.log_every`` steps (step, loss terms, learning
  rates, clips/s, ETA), for logs that are files (nohup, Slurm, CI), where a progress bar is drawn
  once at the end or as a stream of control codes.
- :func:`open_sinks`: the trackers ``train.report_to`` names (``tensorboard``, ``wandb``), fed the
  same rows as ``metrics.jsonl``, as open_clip and torchtune offer. Their packages are optional:
  asking for one that is not installed is a one-line error before any work.
"""

from __future__ import annotations

import importlib.util
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from ssbctl.config import Recipe, to_dict
from ssbctl.core.errors import UserError
from ssbctl.core.io import append_jsonl

REPORT_TO = ("tensorboard", "wandb")
TENSORBOARD_DIR = "tensorboard"  # inside the run folder: `tensorboard --logdir RUN/tensorboard`
_NOT_SCALARS = ("step", "epoch", "time")  # row keys that index the numbers rather than being ones
_PACKAGES = {"tensorboard": ("tensorboard", 'pip install "ssbctl[tensorboard]"'),
             "wandb": ("wandb", 'pip install "ssbctl[wandb]"')}


def check_report_to(names: tuple[str, ...]) -> None:
    """Refuse an unknown tracker name or one whose package is not installed (UserError, one line)."""
    for name in names:
        if name not in REPORT_TO:
            raise UserError(f"recipe key 'train.report_to' must list only {', '.join(REPORT_TO)}, got {name!r}")
        module, install = _PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise UserError(f"train.report_to asks for {name}, which is not installed: {install}")


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a ``metrics.jsonl`` row by tracker tag: ``train/loss``, and for an
    evaluation row ``eval/t2v/R1`` (nested tables flattened; strings, step, epoch and time left out)."""
    out: dict[str, float] = {}

    def walk(tag: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{tag}/{key}", inner)
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[tag] = float(value)

    for key, value in row.items():
        if key not in _NOT_SCALARS:
            walk("eval" if key == "eval" else f"train/{key}", value)
    return out


class Sink(Protocol):
    """One tracker: takes the rows ``metrics.jsonl`` gets."""

    def log(self, row: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


class TensorBoardSink:
    """Event files under ``RUN/tensorboard``, written (and flushed) with each logged row."""

    def __init__(self, run_dir: Path) -> None:
        self.folder = run_dir / TENSORBOARD_DIR
        self.writer: Any = None  # made at the first row: nothing is created in a run that fails its checks

    def log(self, row: dict[str, Any]) -> None:
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.folder))
        for tag, value in scalars(row).items():
            self.writer.add_scalar(tag, value, global_step=int(row["step"]), walltime=row.get("time"))
        self.writer.flush()  # a run killed later keeps what it logged

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class WandbSink:
    """A Weights & Biases run named after the run folder, with the recipe as its config (the
    project from ``WANDB_PROJECT``, else ``ssbctl``; ``WANDB_MODE=offline`` works as usual)."""

    def __init__(self, run_dir: Path, config: dict[str, Any]) -> None:
        self.run_dir, self.config = run_dir, config
        self.run: Any = None

    def log(self, row: dict[str, Any]) -> None:
        if self.run is None:
            import os

            import wandb

            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "ssbctl"), name=self.run_dir.name,
                                  dir=str(self.run_dir), config=self.config)
        self.run.log(scalars(row), step=int(row["step"]))

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


class Sinks:
    """``metrics.jsonl`` and the trackers of ``train.report_to``, fed the same rows."""

    def __init__(self, metrics_file: Path, sinks: list[Sink]) -> None:
        self.metrics_file, self.sinks = metrics_file, sinks

    def append(self, row: dict[str, Any]) -> None:
        """Append ``row`` to ``metrics.jsonl``, then hand it to every tracker."""
        append_jsonl(self.metrics_file, row)
        for sink in self.sinks:
            sink.log(row)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def open_sinks(names: tuple[str, ...], metrics_file: Path, recipe: Recipe) -> Sinks:
    """``metrics_file`` and the trackers ``names`` beside it, in the run folder (checked now; their
    files appear with the first row)."""
    check_report_to(names)
    run_dir = metrics_file.parent
    made: dict[str, Callable[[], Sink]] = {"tensorboard": lambda: TensorBoardSink(run_dir),
                                           "wandb": lambda: WandbSink(run_dir, to_dict(recipe))}
    return Sinks(metrics_file, [made[name]() for name in dict.fromkeys(names)])


# ---------------------------------------------------------------- plain progress lines


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _number(key: str, value: float) -> str:
    if key.startswith("lr"):
        return f"{value:.2e}"
    return f"{value:.4g}"


class LineReporter:
    """Training progress as plain lines on a stream (stderr): one per logged step and one per note.

    A line: ``[HH:MM:SS] step 120/3000 (4%) loss 2.345 ... lr 1.00e-03 | 850 clips/s | ETA 0:12:30``.
    The ETA is the remaining steps at the rate measured since this process started training."""

    def __init__(self, write: Callable[[str], None] | None = None) -> None:
        self.write = write or self._stderr
        self.total, self.first, self.started = 0, 0, time.monotonic()

    @staticmethod
    def _stderr(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    def _line(self, text: str) -> None:
        self.write(f"[{time.strftime('%H:%M:%S')}] {text}")

    def start(self, total: int, done: int) -> None:
        self.total, self.first, self.started = total, done, time.monotonic()
        self._line(f"training: {total} steps" + (f", resuming at step {done}" if done else ""))

    def step(self, step: int, terms: dict[str, float] | None, clips_per_s: float) -> None:
        if terms is None:  # not a logged step
            return
        numbers = " ".join(f"{k.removesuffix('_loss') if k != 'loss' else k} {_number(k, v)}" for k, v in terms.items())
        percent = 100 * step / self.total if self.total else 100.0
        self._line(f"step {step}/{self.total} ({percent:.0f}%) {numbers} | {clips_per_s:.1f} clips/s | "
                   f"ETA {self._eta(step)}")

    def _eta(self, step: int) -> str:
        done, elapsed = step - self.first, time.monotonic() - self.started
        if done <= 0 or elapsed <= 0:
            return "?"
        return _duration((self.total - step) * elapsed / done)

    def note(self, text: str) -> None:
        self._line(text)

    def stop(self) -> None:
        self._line(f"training ended after {_duration(time.monotonic() - self.started)}")
