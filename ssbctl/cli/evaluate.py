"""``ssbctl evaluate``: retrieval metrics of a trained run on a split of prepared data, or of a
recipe's model before training (``--zero-shot``: CLIP zero-shot for the CLIP models)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from ssbctl.cli.common import CheckpointOption, DeviceOption, JsonOption, err, metrics_table, out, print_json

EPILOG = """Examples:

  ssbctl evaluate runs/shapes --split test

  ssbctl evaluate runs/shapes --split test --json | jq .t2v.R1

  ssbctl evaluate runs/msvd --split test --v2t mmt

  ssbctl evaluate --zero-shot --recipe msrvtt --split test   # CLIP zero-shot: the model before training

  ssbctl evaluate runs/msrvtt --zero-shot --split test      # the run's own model at step 0
"""


def _v2t_convention(value: str) -> str:
    """Checks --v2t while the command line is parsed (UserError: one line, exit 2)."""
    from ssbctl.evaluation.metrics import V2T_CONVENTIONS

    if value not in V2T_CONVENTIONS:
        from ssbctl.core.errors import UserError

        raise UserError(f"--v2t must be one of {', '.join(V2T_CONVENTIONS)}, got {value!r}")
    return value


def evaluate(
    ctx: typer.Context,
    run: Annotated[Path | None, typer.Argument(
        metavar="RUN", help="Run folder written by `ssbctl train` (--zero-shot: its model before training).")] = None,
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
    zero_shot: Annotated[bool, typer.Option(
        "--zero-shot", help="Evaluate the model before any training (step 0): pretrained weights, everything "
                            "else at its initial value. With the CLIP models this is CLIP zero-shot.")] = False,
    recipe: Annotated[str | None, typer.Option(
        help="--zero-shot without RUN: the recipe (name or TOML path) whose model and data to use.")] = None,
    overrides: Annotated[list[str] | None, typer.Option(
        "--set", help="--zero-shot --recipe: override a recipe key, model.text.pretrained=DIR (repeatable).")] = None,
) -> None:
    """R@1/5/10, median and mean rank, text-to-video and video-to-text (ties count against the model)."""
    from rich.markup import escape

    from ssbctl.core.errors import UserError

    if not zero_shot and (recipe is not None or overrides):
        raise UserError("--recipe and --set go with --zero-shot (a run evaluates with its own recipe)")
    if run is None and not zero_shot:
        _missing_run(ctx)
    if zero_shot and (run is None) == (recipe is None):
        raise UserError("--zero-shot takes a RUN folder or --recipe NAME, not both" if run else
                        "--zero-shot needs --recipe NAME (or a RUN folder whose recipe to use)")
    if zero_shot and checkpoint is not None:
        raise UserError("--checkpoint and --zero-shot exclude each other (--zero-shot is the model before training)")
    if run is not None and overrides:
        raise UserError("--set goes with --recipe (a RUN's recipe is used as it was trained)")
    result, title, warning = (_zero_shot(run, recipe, overrides or [], split, data, device, v2t) if zero_shot
                              else _trained(run, split, data, checkpoint, device, v2t))
    if warning:
        err.print(f"warning: {escape(warning)}", soft_wrap=True)
    if as_json:
        print_json(result)
        return
    out.print(metrics_table(result, escape(f"{title} on {split}: "
                                           f"{result['n_queries']} captions x {result['n_videos']} videos")))


def _missing_run(ctx: typer.Context) -> None:
    """Click's own usage error for the missing RUN (exit 2), as when the argument was required."""
    exceptions = sys.modules[typer.BadParameter.__module__]
    param = next(p for p in ctx.command.params if p.name == "run")
    raise exceptions.MissingParameter(ctx=ctx, param=param)


def _trained(run: Path | None, split: str, data: str | None, checkpoint: str | None,
             device: str, v2t: str) -> tuple[dict[str, Any], str, str | None]:
    """A run's checkpoint on ``split``: the metrics object, the table's title and the warning
    about videos the split lost at prepare time (None if none)."""
    from ssbctl.data.store import open_stores
    from ssbctl.engine.run import check_store_fits
    from ssbctl.evaluation.evaluate import evaluate_split, lost_videos_warning
    from ssbctl.inference.run import load_run

    assert run is not None
    loaded = load_run(run, checkpoint, device)
    store = open_stores(data or loaded.recipe.data.prepared, loaded.recipe.data.experts)
    check_store_fits(loaded.run_dir, loaded.recipe, store)
    result = evaluate_split(loaded.model, loaded.tokenizer, store, split, loaded.device,
                            source=f"run {run} [{loaded.checkpoint.name}]", v2t_convention=v2t)
    return result, f"{run} [{loaded.checkpoint.name}]", lost_videos_warning(store, split)


def _zero_shot(run: Path | None, recipe_name: str | None, overrides: list[str], split: str, data: str | None,
               device: str, v2t: str) -> tuple[dict[str, Any], str, str | None]:
    """The model of a run's recipe (or of ``--recipe``) before training, on ``split``."""
    from ssbctl.config import load_recipe
    from ssbctl.core.device import resolve_device
    from ssbctl.data.store import open_stores
    from ssbctl.engine.run import read_run_recipe
    from ssbctl.evaluation.evaluate import evaluate_split, lost_videos_warning
    from ssbctl.inference.zero_shot import zero_shot_model

    if run is not None:
        resolved, name = read_run_recipe(run), str(run)
    else:
        assert recipe_name is not None
        resolved, name = load_recipe(recipe_name, overrides), f"recipe {recipe_name}"
    store = open_stores(data or resolved.data.prepared, resolved.data.experts)
    dev = resolve_device(device)
    model, tokenizer = zero_shot_model(resolved, store, dev)
    title = f"{name} [zero-shot: {resolved.model.name or 'model'} at step 0]"
    result = evaluate_split(model, tokenizer, store, split, dev, source=title, v2t_convention=v2t)
    return result, title, lost_videos_warning(store, split)
