"""``ssbctl prepare``: decode a dataset's videos, run frame backbones, write feature stores."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Annotated

import typer

from ssbctl.cli.common import JsonOption, at_least, check_device, err, out, print_json, progress_bar

EPILOG = """Examples:

  ssbctl prepare shapes                                  # synthetic demo data -> $SSBCTL_HOME/data/shapes-pixels

  ssbctl prepare msvd --root /data/msvd --backbone clip  # CLIP ViT-B/32 frames at 1 fps, up to 12

  ssbctl prepare msrvtt --root /data/msrvtt --shard 0/4  # one of four processes; the last one merges

  ssbctl prepare custom --annotations my/captions.jsonl --out data/mine

  ssbctl prepare msvd --download --root /data/msvd       # fetch, resume, check, extract safely, then prepare
"""


def _shard(value: str | None) -> tuple[int, int]:
    from ssbctl.data.prepare import shard_from_env
    from ssbctl.core.errors import UserError

    if value is None:
        return shard_from_env()
    try:
        k, n = (int(x) for x in value.split("/"))
    except ValueError:
        raise UserError(f"--shard must look like K/N (0-based K), got {value!r}") from None
    return k, n


def _positive_fps(value: float) -> float:
    """--fps must be a positive, finite number (0 would sample no frame at all)."""
    import math

    from ssbctl.core.errors import UserError

    if not math.isfinite(value) or value <= 0:
        raise UserError(f"--fps must be a positive number, got {value}")
    return value


def prepare(
    dataset: Annotated[str, typer.Argument(help="msrvtt, msvd, vatex, activitynet, didemo, custom or shapes.")],
    root: Annotated[Path | None, typer.Option(
        help="The dataset folder as its publishers ship it (shapes: where clips are generated).")] = None,
    annotations: Annotated[Path | None, typer.Option(
        help="custom: JSON Lines or CSV of video, caption[, split].")] = None,
    output: Annotated[Path | None, typer.Option(
        "--out", help="Prepared-data folder (default: $SSBCTL_HOME/data/DATASET-BACKBONE).")] = None,
    backbones: Annotated[list[str] | None, typer.Option(
        "--backbone", help="pixels, clip, clip:MODEL or hf:MODEL; repeat for several experts.")] = None,
    features: Annotated[Path | None, typer.Option(
        help="Import pre-extracted features (VIDEO_ID.npy or .safetensors per video) instead of decoding.")] = None,
    download: Annotated[bool, typer.Option(
        help="Download the dataset's files into --root first (resumable, checked).")] = False,
    urls: Annotated[list[str] | None, typer.Option(
        "--url", help="With --download: fetch these instead of the known sources.")] = None,
    sha256: Annotated[str | None, typer.Option(help="With one --url: its expected SHA-256.")] = None,
    max_extract_bytes: Annotated[str | None, typer.Option(
        help="With --download: most bytes one archive may expand to, e.g. 500G "
             "(default 256G; env SSBCTL_MAX_EXTRACT_BYTES).")] = None,
    split: Annotated[str, typer.Option(help="msrvtt: training split 9k or 7k.")] = "9k",
    frames: Annotated[int | None, typer.Option(
        help="Most frames per video (default: the dataset's: 12, or 64 for paragraphs).")] = None,
    sampling: Annotated[str | None, typer.Option(
        help="fps (default for real datasets) or uniform (segment centres).")] = None,
    fps: Annotated[float, typer.Option(help="fps sampling: frames per second.", callback=_positive_fps)] = 1.0,
    pixel_size: Annotated[int, typer.Option(help="pixels backbone: frames are resized to this square size.")] = 16,
    shard: Annotated[str | None, typer.Option(
        help="K/N: prepare every N-th video from the K-th (default: torchrun's RANK/WORLD_SIZE).")] = None,
    workers: Annotated[int, typer.Option(help="Decoding processes (0: in-process, no crash isolation).",
                                         callback=at_least(0, "--workers"))] = 2,
    max_failures: Annotated[int, typer.Option(help="Fail once more videos than this are unusable (-1: never).")] = -1,
    chunk_size: Annotated[int, typer.Option(help="Videos per saved work chunk: what a killed prepare may redo.")] = 64,
    device: Annotated[str, typer.Option(help="Where learned backbones run: auto, cpu, cuda or cuda:N.",
                                        callback=check_device)] = "auto",
    num_videos: Annotated[int, typer.Option(
        help="shapes: clips to generate.", callback=at_least(1, "--num-videos"))] = 600,
    seed: Annotated[int, typer.Option(help="shapes: generation seed.")] = 0,
    as_json: JsonOption = False,
) -> None:
    """Prepare a dataset: videos -> frame features (safetensors) + captions + failures.jsonl. Resumable."""
    from rich.markup import escape

    from ssbctl.data.backbone import FeatureSource
    from ssbctl.data.backbones import ImportedFeatures, backbone_tag, parse_backbone
    from ssbctl.data.datasets import dataset_spec
    from ssbctl.data.datasets.shapes import ShapesSpec
    from ssbctl.data.download import check_download_options, fetch_dataset
    from ssbctl.data.extract import ExtractLimits
    from ssbctl.data.prepare import PrepareOptions, dataset_items, imported_items
    from ssbctl.data.prepare import prepare as run_prepare
    from ssbctl.data.video import Sampling
    from ssbctl.core.errors import UserError
    from ssbctl.core.io import check_output, output_lock, output_path
    from ssbctl.core.paths import home

    sha256 = check_download_options(download, urls, sha256)
    if max_extract_bytes is not None and not download:
        raise UserError("--max-extract-bytes needs --download")
    limits = ExtractLimits.from_env(max_extract_bytes) if download else None
    protocol = dataset_spec(dataset).protocol
    inputs = (annotations, root, features)
    output = output_path(output) if output is not None else None  # `.`, a symlink: see output_path
    if output is not None and (features is not None or len(backbones or ["pixels"]) == 1):
        check_output(output, "store", inputs)  # before any download or decoding
    mode = sampling or ("uniform" if dataset in ("shapes", "custom") else "fps")
    if mode not in ("uniform", "fps") or (frames is not None and frames < 1):
        raise UserError("--sampling must be uniform or fps, and --frames at least 1")
    if download:
        root = root or home() / "raw" / dataset
        with progress_bar("download") as update:
            fetch_dataset(dataset, root, urls, sha256, progress=lambda _name: update, limits=limits)
    with progress_bar("generate clips" if dataset == "shapes" else "read annotations") as update:
        items = dataset_items(dataset, root, annotations, ShapesSpec(num_videos=num_videos, seed=seed), update, split)
    models: list[FeatureSource]
    if features is None:
        models = [parse_backbone(b, pixel_size, device) for b in backbones or ["pixels"]]
    else:
        items, dim = imported_items(items, features)
        models = [ImportedFeatures(dim, str(features))]
    tags = [backbone_tag(m) for m in models]
    if output is None:
        outs = [home() / "data" / f"{dataset}-{t}" for t in tags]
    else:
        outs = [output] if len(models) == 1 else [Path(f"{output}-{t}") for t in tags]
    outs = [output_path(o) for o in outs]
    k, n = _shard(shard)
    opts = PrepareOptions(sampling=Sampling(mode, frames or protocol.max_frames, fps, protocol.max_seconds),
                          shard=k, num_shards=n,
                          workers=workers, max_failures=max_failures, chunk_size=max(1, chunk_size),
                          features=features is not None)
    with ExitStack() as held, progress_bar(f"prepare {dataset} [{k}/{n}]") as update:
        for target in outs:  # one prepare per output (per shard of it: shards run side by side)
            held.enter_context(output_lock(target, f"shard-{k}-of-{n}" if n > 1 else ""))
            check_output(target, "store", inputs)
        summary = run_prepare(dataset, items, models, outs, opts, update)
    if as_json:
        print_json(summary)
        return
    if "merging_elsewhere" in summary:
        from ssbctl.data.prepare import merging_elsewhere_message

        err.print(f"shard {summary['shard']} done; {merging_elsewhere_message(summary['merging_elsewhere'])}")
        return
    if not summary["merged"]:
        out.print(f"shard {summary['shard']} done: {summary['videos']} videos, {summary['failures']} unusable; "
                  f"the last shard to finish merges")
        return
    for manifest in summary["manifests"]:
        for row in manifest["failed"][:20]:
            err.print(f"[yellow]skipped[/] {escape(row['path'])}: {escape(row['reason'])}")
        splits = ", ".join(f"{s} {c['videos']} videos / {c['captions']} captions"
                           for s, c in manifest["splits"].items())
        decoders = ", ".join(f"{name} {n}" for name, n in manifest.get("decoders", {}).items())
        out.print(f"prepared {dataset} -> {escape(str(manifest['out']))}\n  {splits}\n  "
                  + (f"decoded by: {decoders} (per video in videos.jsonl)\n  " if decoders else "")
                  + f"unusable videos: {manifest['counts']['failures']} (listed in failures.jsonl)")
