"""``ssbctl train``: train a recipe into a run folder, or resume one."""

from __future__ import annotations

import os
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated

import typer

from ssbctl.cli.common import JsonOption, RichReporter, at_least, metrics_table, out, print_json

EPILOG = """Examples:

  ssbctl train --recipe shapes --set train.epochs=3

  ssbctl train --recipe recipes/shapes.toml --set model.support.mask=none --out runs/baseline

  ssbctl train --resume --out runs/shapes              # continue from the latest checkpoint

  ssbctl train --recipe shapes --nproc 2 --out runs/shapes-2p   # torchrun --standalone --nproc_per_node 2 ...
"""


def train(
    ctx: typer.Context,
    recipe: Annotated[str | None, typer.Option(help="Recipe name (shapes) or TOML path.")] = None,
    overrides: Annotated[list[str] | None, typer.Option(
        "--set", help="Override a recipe key: train.lr=3e-4 (repeatable).")] = None,
    output: Annotated[Path | None, typer.Option(
        "--out", help="Run folder (default: the recipe's train.output_dir).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its latest checkpoint.")] = False,
    nproc: Annotated[int, typer.Option(
        help="Launch this many processes with torchrun (one per GPU, or gloo on CPU).",
        callback=at_least(1, "--nproc"))] = 1,
    as_json: JsonOption = False,
) -> None:
    """Train the SSB model on prepared data; checkpoints, metrics.jsonl and the resolved recipe go to the run folder.

    train.batch_size is the global batch (the support set and the negatives); each of N processes takes 1/N of it."""
    from rich.markup import escape

    from ssbctl.core.distributed import DistInfo
    from ssbctl.cli.torchrun import launch_torchrun
    from ssbctl.engine.train_setup import preflight, resolve_recipe
    from ssbctl.training import train as run_training
    from ssbctl.core.io import check_output, lock_env, output_lock, output_path

    resolved, run_dir = resolve_recipe(recipe, overrides or [], output, resume)
    run_dir = output_path(run_dir)
    if not resume:
        check_output(run_dir, "run")  # a fresh run writes into --out: only a new, empty or run folder
    if nproc > 1:  # a user error is reported once, before any worker starts
        preflight(resolved, run_dir, resume, nproc)
        with output_lock(run_dir) as lock:  # the launcher holds the run's lock for the processes it starts
            raise typer.Exit(launch_torchrun(nproc, _command_line(ctx), env=lock_env([lock])))
    main_process = int(os.environ.get("RANK", "0")) == 0  # under torchrun rank 0 alone takes the lock
    with output_lock(run_dir) if main_process else nullcontext():
        summary = run_training(resolved, run_dir, resume=resume, reporter=RichReporter())  # leaves the process group
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


def _command_line(ctx: typer.Context) -> list[str]:
    """The arguments this ``ssbctl`` invocation was given (``main(argv)``'s, else ``sys.argv``'s)."""
    import sys

    obj = ctx.find_root().obj
    return list(obj["argv"]) if isinstance(obj, dict) and "argv" in obj else sys.argv[1:]
