"""What every command shares: consoles, progress bars, JSON output and tables."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

err = Console(stderr=True, log_path=False, soft_wrap=True)  # progress, notes and logs: a note is one line
out = Console(soft_wrap=True)  # results

def check_device(value: str) -> str:
    """Checks --device while the command line is parsed, before any work (UserError: one line, exit 2)."""
    from ssbctl.core.device import check_device_name

    return check_device_name(value)


def at_least(low: int, option: str) -> Callable[[int], int]:
    """A Typer callback refusing integers below ``low`` for ``option`` (UserError: one line, exit 2)."""

    def check(value: int) -> int:
        if value < low:
            from ssbctl.core.errors import UserError

            raise UserError(f"{option} must be at least {low}, got {value}")
        return value

    return check


JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON document to stdout instead of a table.")]
DeviceOption = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.", callback=check_device)]
CheckpointOption = Annotated[str | None, typer.Option(help="Checkpoint name or step (default: latest).")]
def _index_or_latest(value: Path | None) -> Path | None:
    """--index, else the newer of the default index and the last trained run's (said on stderr when it is
    the run's, so a search never silently goes to another index than the one the user expects)."""
    if value is not None:
        return value
    from rich.markup import escape

    from ssbctl.core.paths import default_index, search_index

    chosen = search_index()
    if chosen != default_index():
        err.print(escape(f"searching {chosen}: the test videos of the run trained last (newer than "
                         f"{default_index()}; --index to choose)"))
    return chosen


IndexOption = Annotated[Path | None, typer.Option(
    "--index", help="Index folder (default: the newer of $SSBCTL_HOME/index and the last trained run's index).",
    callback=_index_or_latest)]


def _finite(obj: Any) -> Any:
    """``obj`` with every NaN or Inf float replaced by None: JSON has no such numbers."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def print_json(obj: Any) -> None:
    """One JSON document on stdout, for scripts: strict JSON (a non-finite number is null)."""
    sys.stdout.write(json.dumps(_finite(obj), allow_nan=False) + "\n")
    sys.stdout.flush()


def _progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=err, transient=False)


@contextmanager
def progress_bar(description: str) -> Iterator[Callable[[int, int], None]]:
    """A rich progress bar on stderr; yields ``update(done, total)``."""
    with _progress() as bar:
        task = bar.add_task(description, total=None, info="")

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


class RichReporter:
    """Training progress: a bar with the loss terms and clips/s; notes printed above it.

    When stderr is not a terminal (nohup, Slurm, CI: a log file), a plain line every
    ``log_every`` steps instead (:class:`~ssbctl.engine.reporting.LineReporter`)."""

    def __init__(self) -> None:
        self.bar = _progress()
        self.task: Any = None
        self.lines: Any = None
        if not err.is_terminal:
            from ssbctl.engine.reporting import LineReporter

            self.lines = LineReporter()

    def start(self, total: int, done: int) -> None:
        if self.lines is not None:
            self.lines.start(total, done)
            return
        self.bar.start()
        self.task = self.bar.add_task("train", total=total, completed=done, info="")

    def step(self, step: int, terms: dict[str, float] | None, clips_per_s: float) -> None:
        if self.lines is not None:
            self.lines.step(step, terms, clips_per_s)
            return
        if terms is None:  # no new numbers this step (they are read back every log_every steps)
            self.bar.update(self.task, completed=step)
            return
        info = " ".join(f"{k.removesuffix('_loss')[:7]} {v:.3f}" for k, v in terms.items() if not k.startswith("lr"))
        self.bar.update(self.task, completed=step, info=f"{info} | {clips_per_s:.0f} clips/s")

    def note(self, text: str) -> None:
        if self.lines is not None:
            self.lines.note(text)
            return
        self.bar.console.log(text)

    def stop(self) -> None:
        if self.lines is not None:
            self.lines.stop()
            return
        self.bar.stop()


def metrics_table(result: dict[str, Any], title: str) -> Table:
    """Text-to-video and video-to-text metrics side by side. Video-to-text rows name their
    convention; a set with several captions per video gets a row for each, ``v2t``'s first."""
    from ssbctl.evaluation.metrics import V2T_DESCRIPTIONS

    chosen = result.get("v2t_convention")
    both = sorted((c for c in V2T_DESCRIPTIONS if f"v2t_{c}" in result), key=lambda c: c != chosen)
    rows = [("t2v", "text-to-video")]
    rows += [(f"v2t_{c}", f"video-to-text, {c}") for c in both] or [
        ("v2t", f"video-to-text, {chosen}" if chosen else "video-to-text")]
    caption = "\n".join(f"video-to-text {c}: {V2T_DESCRIPTIONS[c]}" for c in both) or None
    table = Table(title=title, caption=caption)
    table.add_column("direction")
    keys = [k for k in result["t2v"]]
    for key in keys:
        table.add_column(key.replace("R", "R@") if key[1:].isdigit() else key, justify="right")
    for direction, name in rows:
        table.add_row(name, *(f"{result[direction][k]:.1f}" for k in keys))
    return table
