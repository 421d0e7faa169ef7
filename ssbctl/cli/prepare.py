"""``ssbctl prepare``: decode a dataset's videos, run frame backbones, write feature stores."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Annotated

import typer

from ssbctl.cli.common import JsonOption, at_least, check_device, err, out, print_json, progress_bar

EPILOG = """Examples:

  ssbctl prepare shapes                                  # synthetic demo data -> $SSBCTL_HOME/data/shapes-pixels

  ssbctl prepare msvd           # downloads MSVD into $SSBCTL_HOME/raw/msvd, prepares what `--recipe msvd` trains on

  ssbctl prepare msvd --root /data/msvd --backbone clip  # CLIP ViT-B/32 frames at 1 fps, up to 12

  ssbctl prepare msrvtt --root /data/msrvtt --shard 0/4  # one of four processes; the last one merges

  ssbctl prepare custom --annotations my/captions.jsonl --out data/mine

  ssbctl prepare msvd --download --root /data/msvd       # fetch, resume, check, extract safely, then prepare
"""


def _shard(value: str | None) -> tuple[int, int]:
    from ssbctl.core.errors import UserError
    from ssbctl.data.prepare import shard_from_env

    if value is None:
        return shard_from_env()
    try:
        k, n = (int(x) for x in value.split("/"))
    except ValueError:
        raise UserError(f"--shard must look like K/N (0-based K), got {value!r}") from None
    return k, n


def _is_empty(folder: Path) -> bool:
    """No dataset files in ``folder``: it is missing, empty, or holds only an unfinished download."""
    return not folder.is_dir() or all(p.name == "downloads" for p in folder.iterdir())


def _default_root(dataset: str) -> Path:
    """``$SSBCTL_HOME/raw/DATASET``; when it is empty, the dataset is downloaded there if its
    publishers serve all of it (after saying what and how big), else a UserError says what to put there."""
    from rich.markup import escape

    from ssbctl.core.errors import UserError
    from ssbctl.core.paths import home
    from ssbctl.data.datasets import dataset_spec
    from ssbctl.data.download import AUTO_DOWNLOAD, SOURCES, describe_download, fetch_dataset, human_size, sources_for
    from ssbctl.data.extract import ExtractLimits

    root = home() / "raw" / dataset
    if not _is_empty(root):
        return root
    if dataset not in AUTO_DOWNLOAD:
        fetch = " (`--download` fetches what can be fetched: " + SOURCES[dataset][-1].note + ")" \
            if dataset in SOURCES and SOURCES[dataset][-1].note else " (or `--download` to fetch it)"
        raise UserError(f"{dataset}: no data in {root}; put {dataset_spec(dataset).layout} there, "
                        f"or give --root FOLDER{fetch}")
    sources = sources_for(dataset)
    lines, total = describe_download(sources)
    size = human_size(total) if total is not None else "size unknown"
    err.print(escape(f"{dataset} is not in {root}: downloading it from its publishers ({size}):"))
    for line in lines:
        err.print(escape(f"  {line}"))
    limits = ExtractLimits.from_env()
    with progress_bar("download") as update:
        fetch_dataset(dataset, root, progress=lambda _name: update, limits=limits)
    return root


def _chosen_backbones(dataset: str, named_out: bool) -> list[str]:
    """The backbones a dataset is prepared with when none is given: those its shipped recipe trains
    on (so `prepare msvd` writes what `--recipe msvd` reads), else pixels; said on stderr."""
    from rich.markup import escape

    from ssbctl.config import read_toml
    from ssbctl.core.paths import shipped_configs

    shipped = shipped_configs("recipes").get(dataset)
    if shipped is None:
        err.print("backbone: pixels (none given): frames resized to --pixel-size and flattened, "
                  "which suits synthetic clips; for real footage give --backbone clip (what the msrvtt recipe "
                  "trains on)")
        return ["pixels"]
    data = read_toml(shipped).get("data", {})
    chosen = []
    for prepared in [data.get("prepared", ""), *data.get("experts", [])]:
        tag = str(prepared).split("-", 1)[-1]
        spec = next((s for s in KNOWN_BACKBONES if backbone_spec_tag(s) == tag), None)
        if spec is None:
            raise AssertionError(f"recipe {dataset} names prepared data '{prepared}' of no known backbone")
        chosen.append(spec)
    from ssbctl.core.paths import home

    where = "" if named_out else " -> " + ", ".join(str(home() / "data" / f"{dataset}-{backbone_spec_tag(s)}")
                                                   for s in chosen)
    err.print(escape(f"backbone: {', '.join(chosen)} (none given): what `ssbctl train --recipe {dataset}` "
                     f"trains on{where}"))
    return chosen


KNOWN_BACKBONES = ("pixels", "clip")  # the --backbone values shipped recipes are prepared with


def backbone_spec_tag(spec: str) -> str:
    """The folder-name tag (see :func:`ssbctl.data.backbones.backbone_tag`) a --backbone value gives,
    without loading its model: pixels -> pixels, clip -> clip-vit-base-patch32, hf:org/model -> model."""
    from ssbctl.data.hf_backbones import DEFAULT_CLIP

    name, _, model = spec.partition(":")
    if name == "clip" and not model:
        model = DEFAULT_CLIP
    return model.rstrip("/").rsplit("/", 1)[-1] if model else name


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
        help="The dataset folder as its publishers ship it (default: $SSBCTL_HOME/raw/DATASET; "
             "shapes: where clips are generated).")] = None,
    annotations: Annotated[Path | None, typer.Option(
        help="custom: JSON Lines or CSV of video, caption[, split].")] = None,
    output: Annotated[Path | None, typer.Option(
        "--out", help="Prepared-data folder (default: $SSBCTL_HOME/data/DATASET-BACKBONE).")] = None,
    backbones: Annotated[list[str] | None, typer.Option(
        "--backbone", help="pixels, clip, clip:MODEL or hf:MODEL; repeat for several experts "
                           "(default: the one the dataset's recipe trains on; custom: pixels).")] = None,
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
    pixel_size: Annotated[int, typer.Option(help="pixels backbone: frames are resized to this square size.")] = 32,
    full_frames: Annotated[bool, typer.Option(
        "--full-frames", help="Decode full frames and resize them afterwards (default: decode at the size "
                              "the backbone needs; the store records which).")] = False,
    shard: Annotated[str | None, typer.Option(
        help="K/N: prepare every N-th video from the K-th (default: torchrun's RANK/WORLD_SIZE).")] = None,
    workers: Annotated[int, typer.Option(help="Decoding processes (0: in-process, no crash isolation).",
                                         callback=at_least(0, "--workers"))] = 2,
    max_failures: Annotated[int, typer.Option(help="Fail once more videos than this are unusable (-1: never).")] = -1,
    chunk_size: Annotated[int, typer.Option(help="Videos per saved work chunk: what a killed prepare may redo.")] = 64,
    device: Annotated[str, typer.Option(help="Where learned backbones run: auto, cpu, cuda or cuda:N.",
                                        callback=check_device)] = "auto",
    num_videos: Annotated[int, typer.Option(
        help="shapes: clips to generate.", callback=at_least(1, "--num-videos"))] = 1000,
    seed: Annotated[int, typer.Option(help="shapes: generation seed.")] = 0,
    as_json: JsonOption = False,
) -> None:
    """Prepare a dataset: videos -> frame features (safetensors) + captions + failures.jsonl. Resumable."""
    from rich.markup import escape

    from ssbctl.core.errors import UserError
    from ssbctl.core.io import check_output, output_lock, output_path
    from ssbctl.core.paths import home
    from ssbctl.data.backbone import FeatureSource
    from ssbctl.data.backbones import ImportedFeatures, backbone_tag, parse_backbone
    from ssbctl.data.datasets import dataset_spec
    from ssbctl.data.datasets.shapes import ShapesSpec
    from ssbctl.data.download import check_download_options, fetch_dataset
    from ssbctl.data.extract import ExtractLimits
    from ssbctl.data.prepare import PrepareOptions, dataset_items, imported_items
    from ssbctl.data.prepare import prepare as run_prepare
    from ssbctl.data.video import Sampling

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
    elif root is None and dataset not in ("shapes", "custom"):
        root = _default_root(dataset)
    if backbones is None and features is None:
        backbones = _chosen_backbones(dataset, output is not None)
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
                          features=features is not None, full_frames=full_frames)
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
