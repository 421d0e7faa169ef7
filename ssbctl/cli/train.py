"""``ssbctl train``: train a recipe into a run folder, or resume one."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ssbctl.cli.common import JsonOption, RichReporter, metrics_table, out, print_json

EPILOG = """Examples:

  ssbctl train --recipe shapes --set train.epochs=3

  ssbctl train --recipe recipes/shapes.toml --set model.support.mask=none --out runs/baseline

  ssbctl train --resume --out runs/shapes              # continue from the latest checkpoint

  ssbctl train --recipe shapes --nproc 2               # = torchrun --standalone --nproc_per_node 2 -m ssbctl train ...
"""


def train(
    recipe: Annotated[str | None, typer.Option(help="Recipe name (shapes) or TOML path.")] = None,
    overrides: Annotated[list[str] | None, typer.Option("--set", help="Override a recipe key: train.lr=3e-4 (repeatable).")] = None,
    output: Annotated[Path | None, typer.Option("--out", help="Run folder (default: the recipe's train.output_dir).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its latest checkpoint.")] = False,
    nproc: Annotated[int, typer.Option(help="Launch this many processes with torchrun (one per GPU, or gloo on CPU).")] = 1,
    as_json: JsonOption = False,
) -> None:
    """Train the SSB model on prepared data; checkpoints, metrics.jsonl and the resolved recipe go to the run folder.

    train.batch_size is the global batch (the support set and the negatives); each of N processes takes 1/N of it."""
    from rich.markup import escape

    from ssbctl.engine.distributed import DistInfo, teardown
    from ssbctl.engine.train_setup import launch_torchrun, preflight, resolve_recipe
    from ssbctl.engine.trainer import train as run_training

    resolved, run_dir = resolve_recipe(recipe, overrides or [], output, resume)
    if nproc > 1:
        preflight(resolved, run_dir, resume)  # a user error is reported once, before any worker starts
        raise typer.Exit(launch_torchrun(nproc))
    try:
        summary = run_training(resolved, run_dir, resume=resume, reporter=RichReporter())
    finally:
        teardown()
    if not DistInfo(rank=summary["rank"]).is_main:
        return
    if as_json:
        print_json(summary)
        return
    if summary["eval"]:
        out.print(metrics_table(summary["eval"], f"{summary['eval']['split']} split, step {summary['steps']}"))
    how = f" (stopped by {summary['stopped_by']}; continue with --resume)" if summary["stopped_by"] else ""
    out.print(escape(f"trained {summary['steps']} steps -> {run_dir}{how}\n"
                     f"next: ssbctl evaluate {run_dir} --split test"))
