"""``ssbctl evaluate``: retrieval metrics of a trained run on a split of prepared data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ssbctl.cli.common import CheckpointOption, DeviceOption, JsonOption, metrics_table, out, print_json

EPILOG = """Examples:

  ssbctl evaluate runs/shapes --split test

  ssbctl evaluate runs/shapes --split test --json | jq .t2v.R1
"""


def evaluate(
    run: Annotated[Path, typer.Argument(help="Run folder written by `ssbctl train`.")],
    split: Annotated[str, typer.Option(help="Split to evaluate.")] = "test",
    data: Annotated[str | None, typer.Option(help="Prepared data (default: the run's recipe's).")] = None,
    checkpoint: CheckpointOption = None,
    device: DeviceOption = "auto",
    as_json: JsonOption = False,
) -> None:
    """R@1/5/10, median and mean rank, text-to-video and video-to-text (ties count against the model)."""
    from rich.markup import escape

    from ssbctl.engine.run import check_store_fits
    from ssbctl.inference.run import load_run
    from ssbctl.evaluation.evaluate import evaluate_split
    from ssbctl.data.store import open_stores

    loaded = load_run(run, checkpoint, device)
    store = open_stores(data or loaded.recipe.data.prepared, loaded.recipe.data.experts)
    check_store_fits(loaded.run_dir, loaded.recipe, store)
    result = evaluate_split(loaded.model, loaded.tokenizer, store, split, loaded.device,
                            source=f"run {run} [{loaded.checkpoint.name}]")
    if as_json:
        print_json(result)
        return
    out.print(metrics_table(result, escape(f"{run} [{loaded.checkpoint.name}] on {split}: "
                                           f"{result['n_queries']} captions x {result['n_videos']} videos")))
