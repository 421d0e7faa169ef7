"""``ssbctl index``: embed prepared videos with a trained run into a search index."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ssbctl.cli.common import CheckpointOption, DeviceOption, JsonOption, at_least, out, print_json

EPILOG = """Examples:

  ssbctl index runs/shapes                      # the run's prepared data, all splits

  ssbctl index runs/shapes --data shapes-pixels --split test --out my-index

  ssbctl index runs/shapes --videos ~/Videos --out my-videos   # any mp4/webm/mkv/avi; re-runs embed only new files

  ssbctl index runs/shapes --videos ~/Movies --out my-videos   # adds a second folder to the same index

  ssbctl index runs/msvd --out my-videos --replace             # start my-videos afresh (drops what it held)
"""


def index(
    run: Annotated[Path, typer.Argument(help="Run folder written by `ssbctl train`.")],
    data: Annotated[str | None, typer.Option(help="Prepared data to index (default: the run's).")] = None,
    videos: Annotated[Path | None, typer.Option(
        help="Index the video files under this folder instead (incremental).")] = None,
    half: Annotated[bool, typer.Option(help="Store embeddings as float16.")] = False,
    workers: Annotated[int, typer.Option(help="--videos: decoding processes.", callback=at_least(0, "--workers"))] = 2,
    faiss: Annotated[str | None, typer.Option(
        help="Also build an approximate faiss index: 'ivf' or a faiss factory string (IVF4096,PQ32).")] = None,
    split: Annotated[list[str] | None, typer.Option(help="Only these splits (repeatable; default: all).")] = None,
    output: Annotated[Path | None, typer.Option("--out", help="Index folder (default: $SSBCTL_HOME/index).")] = None,
    replace: Annotated[bool, typer.Option(
        help="Replace the index in --out instead of adding to it (needed to drop videos of other folders, "
             "or an index another run embedded).")] = False,
    checkpoint: CheckpointOption = None,
    device: DeviceOption = "auto",
    as_json: JsonOption = False,
) -> None:
    """Build an index folder: normalised video embeddings, ids and source paths."""
    from rich.markup import escape

    from ssbctl.core.io import check_output, output_lock, output_path
    from ssbctl.core.paths import default_index

    target = output_path(output or default_index())
    with output_lock(target):
        check_output(target, "index", (run, videos))  # only an earlier index is replaced
        summary = _build(run, data, videos, half, workers, faiss, split, target, checkpoint, device, replace)
    if as_json:
        print_json(summary)
        return
    kept = f", kept {summary['kept']} indexed earlier" if summary["kept"] else ""
    out.print(f"indexed {summary['videos']} videos -> {escape(str(target))} (embedded {summary['embedded']}, "
              f"reused {summary['reused']}{kept}, unreadable {len(summary['failed'])}, removed {summary['removed']})")
    shown = summary["removed_videos"][:10]
    for key in shown:
        out.print(f"  removed {escape(key)}")
    if summary["removed"] > len(shown):
        out.print(f"  ... and {summary['removed'] - len(shown)} more (all listed by --json)")


def _build(run: Path, data: str | None, videos: Path | None, half: bool, workers: int, faiss: str | None,
           split: list[str] | None, target: Path, checkpoint: str | None, device: str,
           replace: bool) -> dict[str, Any]:
    """Write the index folder ``target`` (the caller holds its lock); return the summary."""
    import torch
    from rich.markup import escape

    from ssbctl.cli.common import err, progress_bar
    from ssbctl.core.errors import UserError
    from ssbctl.core.io import check_output
    from ssbctl.data.store import open_stores
    from ssbctl.engine.run import check_store_fits
    from ssbctl.inference.run import load_run
    from ssbctl.retrieval.build import check_replace, index_store, merge, row_key
    from ssbctl.retrieval.index import Index
    from ssbctl.retrieval.videos import find_videos, index_videos

    if videos is not None and split:
        raise UserError("--split selects prepared data; it does not go with --videos")
    if videos is not None and data is not None:
        raise UserError("--data indexes prepared data and --videos a folder of video files: give one of them")
    loaded = load_run(run, checkpoint, device)
    dtype = torch.float16 if half else torch.float32
    if videos is not None:
        _warn_footage(loaded.run_dir, find_videos(videos))
        with progress_bar("index videos") as update:
            summary = index_videos(loaded, videos, target, dtype, workers, update, replace)
        for row in summary["failed"]:
            err.print(f"[yellow]skipped[/] {escape(row['path'])}: {escape(row['reason'])}")
    else:
        store = open_stores(data or loaded.recipe.data.prepared, loaded.recipe.data.experts)
        check_output(target, "index", [store.root, *(s.root for s in store.extra)])
        check_store_fits(loaded.run_dir, loaded.recipe, store)
        old = Index.load(target) if (target / "index.json").is_file() else None
        chosen = [v for v in store.videos if not split or v["split"] in split]
        check_replace(old, loaded, {row_key(v) for v in chosen}, replace)
        built, removed = merge(old, index_store(loaded, store, split or None), loaded, replace, store.root)
        built.save(target, dtype)
        summary = {"index": str(target), "videos": len(built.videos), "embedded": len(chosen), "reused": 0,
                   "kept": len(built.videos) - len(chosen), "failed": [], "removed": len(removed),
                   "removed_videos": removed}
    if faiss:
        from ssbctl.core.io import atomic_write_json
        from ssbctl.retrieval.ann import build_ann
        built_index = Index.load(target)
        summary["faiss"] = build_ann(built_index.embeddings, target, "" if faiss == "ivf" else faiss)
        atomic_write_json(target / "index.json", {**built_index.meta, "faiss": summary["faiss"]})
    return summary


def _warn_footage(run_dir: Path, files: list[Path]) -> None:
    """Warn on stderr when the videos obviously differ from what the run's features were made from."""
    from rich.markup import escape

    from ssbctl.cli.common import err
    from ssbctl.data.footage import footage_warnings
    from ssbctl.engine.run import read_expert_specs

    for line in footage_warnings(read_expert_specs(run_dir), files):
        err.print(f"[yellow]warning:[/] {escape(line)}")
