"""``ssbctl prepare``: decode a dataset's videos, run a frame backbone, write a feature store."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ssbctl.cli.common import JsonOption, err, out, print_json, progress_bar

EPILOG = """Examples:

  ssbctl prepare shapes                      # synthetic demo data into $SSBCTL_HOME/data/shapes

  ssbctl prepare custom --annotations my/captions.jsonl --out data/mine
"""


def prepare(
    dataset: Annotated[str, typer.Argument(help="shapes (synthetic) or custom (your videos).")],
    root: Annotated[Path | None, typer.Option(help="Folder with the dataset's videos (shapes: where to generate them).")] = None,
    annotations: Annotated[Path | None, typer.Option(help="custom: JSON Lines or CSV of video, caption[, split].")] = None,
    output: Annotated[Path | None, typer.Option("--out", help="Prepared-data folder (default: $SSBCTL_HOME/data/DATASET).")] = None,
    backbone: Annotated[str, typer.Option(help="Frame backbone.")] = "pixels",
    pixel_size: Annotated[int, typer.Option(help="pixels backbone: frames are resized to this square size.")] = 16,
    frames: Annotated[int, typer.Option(help="Frames kept per video (most frames in fps mode).")] = 8,
    sampling: Annotated[str, typer.Option(help="uniform (segment centres) or fps.")] = "uniform",
    fps: Annotated[float, typer.Option(help="fps sampling: frames per second.")] = 1.0,
    num_videos: Annotated[int, typer.Option(help="shapes: clips to generate.")] = 600,
    seed: Annotated[int, typer.Option(help="shapes: generation seed.")] = 0,
    as_json: JsonOption = False,
) -> None:
    """Prepare a dataset: videos -> frame features (safetensors) + captions + failures.jsonl."""
    from ssbctl.data.backbones import build_backbone
    from ssbctl.data.datasets.shapes import ShapesSpec
    from ssbctl.data.prepare import dataset_items, prepare_items
    from ssbctl.data.video import Sampling
    from ssbctl.errors import UserError
    from ssbctl.paths import home

    if sampling not in ("uniform", "fps"):
        raise UserError(f"--sampling must be uniform or fps, got {sampling!r}")
    if frames < 1:
        raise UserError("--frames must be at least 1")
    options = {"size": pixel_size} if backbone == "pixels" else {}
    model = build_backbone(backbone, **options)
    with progress_bar("generate clips" if dataset == "shapes" else "read annotations") as update:
        items = dataset_items(dataset, root, annotations, ShapesSpec(num_videos=num_videos, seed=seed), update)
    target = output or home() / "data" / dataset
    with progress_bar(f"prepare {dataset}") as update:
        manifest = prepare_items(items, target, dataset, model, Sampling(sampling, frames, fps), update)
    failed = manifest.pop("failed")
    for row in failed:
        err.print(f"[yellow]skipped[/] {row['path']}: {row['reason']}")
    summary = {"out": str(target), **manifest}
    if as_json:
        print_json(summary)
        return
    splits = ", ".join(f"{s} {n['videos']} videos / {n['captions']} captions" for s, n in manifest["splits"].items())
    out.print(f"prepared {dataset} -> {target}\n  {splits}\n  failures: {len(failed)} (see failures.jsonl)")
