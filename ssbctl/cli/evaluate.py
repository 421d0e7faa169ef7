"""``ssbctl evaluate``: retrieval metrics of a trained run on a split of prepared data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ssbctl.cli.common import CheckpointOption, DeviceOption, JsonOption, err, metrics_table, out, print_json

EPILOG = """Examples:

  ssbctl evaluate runs/shapes --split test

  ssbctl evaluate runs/shapes --split test --json | jq .t2v.R1

  ssbctl evaluate runs/msvd --split test --v2t mmt
"""


def _v2t_convention(value: str) -> str:
    """Checks --v2t while the command line is parsed (UserError: one line, exit 2)."""
    from ssbctl.evaluation.metrics import V2T_CONVENTIONS

    if value not in V2T_CONVENTIONS:
        from ssbctl.core.errors import UserError

        raise UserError(f"--v2t must be one of {', '.join(V2T_CONVENTIONS)}, got {value!r}")
    return value


def evaluate(
    run: Annotated[Path, typer.Argument(help="Run folder written by `ssbctl train`.")],
    split: Annotated[str, typer.Option(help="Split to evaluate.")] = "test",
    data: Annotated[str | None, typer.Option(help="Prepared data (default: the run's recipe's).")] = None,
    checkpoint: CheckpointOption = None,
    device: DeviceOption = "auto",
    as_json: JsonOption = False,
    v2t: Annotated[str, typer.Option(
        "--v2t", callback=_v2t_convention, metavar="clip4clip|mmt",
        help="Video-to-text convention of `v2t` where videos have several captions (both are reported): "
             "clip4clip ranks videos by the max over their captions (CLIP4Clip's tables); mmt ranks each "
             "video's best caption among all captions (MMT's).")] = "clip4clip",
) -> None:
    """R@1/5/10, median and mean rank, text-to-video and video-to-text (ties count against the model)."""
    from rich.markup import escape

    from ssbctl.engine.run import check_store_fits
    from ssbctl.inference.run import load_run
    from ssbctl.evaluation.evaluate import evaluate_split, lost_videos_warning
    from ssbctl.data.store import open_stores

    loaded = load_run(run, checkpoint, device)
    store = open_stores(data or loaded.recipe.data.prepared, loaded.recipe.data.experts)
    check_store_fits(loaded.run_dir, loaded.recipe, store)
    result = evaluate_split(loaded.model, loaded.tokenizer, store, split, loaded.device,
                            source=f"run {run} [{loaded.checkpoint.name}]", v2t_convention=v2t)
    warning = lost_videos_warning(store, split)
    if warning:
        err.print(f"warning: {escape(warning)}", soft_wrap=True)
    if as_json:
        print_json(result)
        return
    out.print(metrics_table(result, escape(f"{run} [{loaded.checkpoint.name}] on {split}: "
                                           f"{result['n_queries']} captions x {result['n_videos']} videos")))
