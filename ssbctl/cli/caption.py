"""``ssbctl caption``: describe videos in words, decoded from the support set, and show which
indexed videos each caption drew on."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from ssbctl.cli.common import CheckpointOption, DeviceOption, JsonOption, at_least, err, out, print_json

if TYPE_CHECKING:
    import torch

    from ssbctl.inference.caption import CaptionResult
    from ssbctl.inference.run import LoadedRun
    from ssbctl.retrieval.index import Index

EPILOG = """Examples:

  ssbctl caption runs/shapes --index my-index                 # every video of an index the run built

  ssbctl caption runs/shapes --video clip.mp4 --index my-index --beam 4   # a file, drawing on that index

  ssbctl caption runs/shapes --video clip.mp4 --index my-index --json --sheet support.png
"""

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _split(values: list[str] | None) -> list[str]:
    """Repeated and comma-separated values as one list (``--ids a,b --ids c``)."""
    return [v.strip() for value in values or [] for v in value.split(",") if v.strip()]


def _check_sheet(path: Path | None) -> None:
    """``--sheet`` must be a new file or an earlier PNG: any other file is the user's, never overwritten."""
    from ssbctl.core.errors import UserError

    if path is None:
        return
    if path.is_dir():
        raise UserError(f"--sheet {path}: expected a PNG file path, not a folder")
    if os.path.lexists(path):
        try:
            with open(path, "rb") as fh:
                is_png = fh.read(len(PNG_MAGIC)) == PNG_MAGIC
        except OSError:
            is_png = False
        if not is_png:
            raise UserError(f"--sheet {path} exists and is not a PNG picture; nothing was changed "
                            f"(choose another file name)")


def _default_index(run_dir: Path, mask: str) -> Index | None:
    """What ``--video`` without ``--index`` draws on: the default index when this run made it;
    None under the identity mask (a video draws on itself alone); else a UserError."""
    from ssbctl.core.errors import UserError
    from ssbctl.core.paths import default_index
    from ssbctl.retrieval.index import Index

    folder = default_index()
    index = Index.load(folder) if (folder / "index.json").is_file() else None
    if index is not None and Path(str(index.meta.get("run", run_dir))).resolve() == run_dir.resolve():
        return index
    if mask == "identity":
        return None
    raise UserError(f"the run's support set is {mask}: a caption draws on other videos; name an index of this "
                    f"run's videos with --index (build one with `ssbctl index`)")


def _same_run(recorded: Path, run_dir: Path, checkpoint: Any) -> bool:
    """Whether ``run_dir`` is the run an index recorded: the same folder, or (moved or copied) one
    whose checkpoint weights are the same bytes; a recorded run that no longer exists is taken to
    have moved (the checkpoint name is still checked)."""
    import filecmp

    if recorded.resolve() == run_dir.resolve() or not recorded.exists():
        return True
    if not isinstance(checkpoint, str):
        return False
    mine, theirs = (folder / "checkpoints" / Path(checkpoint).name / "model.safetensors"
                    for folder in (run_dir, recorded))
    return mine.is_file() and theirs.is_file() and filecmp.cmp(mine, theirs, shallow=False)


def _checkpoint(run_dir: Path, index: Index | None, checkpoint: str | None) -> str | None:
    """The checkpoint to load: the index's own when none is named (its embeddings live in that
    checkpoint's space); a UserError when the index is another run's or another checkpoint's."""
    from ssbctl.core.errors import UserError
    from ssbctl.engine.checkpoint import find_checkpoint

    if index is None or "run" not in index.meta:
        return checkpoint
    if not _same_run(Path(index.meta["run"]), run_dir, index.meta.get("checkpoint")):
        raise UserError(f"index {index.folder} holds embeddings of run {index.meta['run']}, not {run_dir}: "
                        f"build an index with this run (`ssbctl index`)")
    made_with = index.meta.get("checkpoint")
    if checkpoint is None:
        return made_with
    if made_with is not None and find_checkpoint(run_dir, checkpoint).name != made_with:
        raise UserError(f"index {index.folder} was embedded with checkpoint {made_with}, not {checkpoint}: "
                        f"rebuild the index or leave --checkpoint out")
    return checkpoint


def _queries(run: LoadedRun, index: Index | None, videos: list[Path],
             ids: list[str]) -> tuple[torch.Tensor, list[str | None], list[str | None]]:
    """Embeddings of the videos to caption, with their ids (indexed videos) or paths (files)."""
    from ssbctl.core.errors import UserError

    if videos:
        missing = [p for p in videos if not p.is_file()]
        if missing:
            raise UserError(f"video file not found: {missing[0]}")
        none: list[str | None] = [None] * len(videos)
        return run.encode_video(list(videos)), none, [str(p) for p in videos]
    assert index is not None  # given: --index is required without --video
    rows = {v["video_id"]: i for i, v in enumerate(index.videos)}
    unknown = [i for i in ids if i not in rows]
    if unknown:
        raise UserError(f"--ids {unknown[0]}: no such video in index {index.folder}")
    chosen = [rows[i] for i in ids] if ids else list(range(len(index.videos)))
    if not chosen:
        raise UserError(f"index {index.folder} is empty: there is no video to caption")
    return index.embeddings[chosen], [str(index.videos[r]["video_id"]) for r in chosen], [None] * len(chosen)


def _table(result: CaptionResult, mask: str) -> Table:
    """One video's caption as a table of the support videos it drew on."""
    title = (f"{result.name}\n\"{result.caption}\"\nlog-prob {result.log_prob:.2f} "
             f"({result.score:.2f} per token, {result.tokens} tokens{'' if result.ended else ', cut at the limit'})")
    listed = sum(s["weight"] for s in result.support)
    table = Table(title=escape(title), caption=escape(
        f"top {len(result.support)} of {int((result.weights > 0).sum())} support videos ({mask} mask) "
        f"carry {listed:.3f} of the attention"))
    for col in ("rank", "video_id", "weight", "path"):
        table.add_column(col, justify="right" if col in ("rank", "weight") else "left")
    for s in result.support:
        table.add_row(str(s["rank"]), escape(s["video_id"]), f"{s['weight']:.3f}", escape(s["path"]))
    return table


def _sheet(index: Index | None, results: list[CaptionResult], top: int, path: Path) -> tuple[int, int]:
    """Contact sheet: per video, its caption and a strip of frames of each of its top support videos."""
    from ssbctl.retrieval.render import contact_sheet, result_frames

    row_of = {v["video_id"]: i for i, v in enumerate(index.videos)} if index is not None else {}
    rows = []
    for r in results:
        hits = [{"rank": s["rank"], "score": s["weight"], "video_id": s["video_id"]} for s in r.support]
        strips = [result_frames(s["path"], index.thumbnail(row_of[s["video_id"]])
                                if index is not None and s["video_id"] in row_of else None)
                  for s in r.support]
        rows.append((f"{r.name}: {r.caption}", hits, strips))
    return contact_sheet(rows, max(top, 1), path)


def caption(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN", help="A run folder trained with a support set.")],
    video: Annotated[list[Path] | None, typer.Option(
        "--video", help="A video file to caption (repeatable).")] = None,
    index_dir: Annotated[Path | None, typer.Option(
        "--index", help="Index of this run's videos: what captions draw on, and (without --video) what to caption. "
                        "Default with --video: $SSBCTL_HOME/index.")] = None,
    ids: Annotated[list[str] | None, typer.Option(
        "--ids", help="With --index: the indexed videos to caption (repeatable or comma-separated; default all).")
    ] = None,
    beam: Annotated[int, typer.Option(help="Beam width; 1 decodes greedily.", callback=at_least(1, "--beam"))] = 1,
    top: Annotated[int, typer.Option(help="Support videos to list per caption.", callback=at_least(1, "--top"))] = 5,
    sheet: Annotated[Path | None, typer.Option(
        help="Write a PNG: each caption over the thumbnails of the support videos it drew on.")] = None,
    checkpoint: CheckpointOption = None,
    device: DeviceOption = "auto",
    as_json: JsonOption = False,
) -> None:
    """Caption videos from the support set: the attention over the index's videos under the run's mask, and
    the words the run's decoder reads from it."""
    from ssbctl.core.errors import UserError
    from ssbctl.inference.caption import run_decoder
    from ssbctl.inference.run import load_run
    from ssbctl.retrieval.index import Index

    videos, wanted = list(video or []), _split(ids)
    if videos and wanted:
        raise UserError("--ids picks indexed videos; it does not go with --video")
    if not videos and index_dir is None:
        raise UserError("give --video FILE (repeatable) or --index INDEX [--ids ID ...]")
    _check_sheet(sheet)
    if not run_dir.is_dir():
        raise UserError(f"run folder not found: {run_dir}")
    index = Index.load(index_dir) if index_dir is not None else None
    run = load_run(run_dir, _checkpoint(run_dir, index, checkpoint), device)
    run_decoder(run)  # a run without a decoder is refused before any video is read
    mask = run.model.cfg.support.mask
    if index is None:
        index = _default_index(run_dir, mask)
        _checkpoint(run_dir, index, run.checkpoint.name)
    if index is not None and index.embeddings.shape[1] != run.model.cfg.embed_dim:
        raise UserError(f"index {index.folder} holds {index.embeddings.shape[1]}-d embeddings; the run embeds to "
                        f"{run.model.cfg.embed_dim}: build an index with this run")
    embeddings, query_ids, paths = _queries(run, index, videos, wanted)
    results = run.caption(embeddings, index, ids=query_ids, paths=paths, beam=beam, top=top)
    if sheet:
        size = _sheet(index, results, top, sheet)
        err.print(escape(f"contact sheet {size[0]}x{size[1]} -> {sheet}"))
    if as_json:
        print_json({"run": str(run.run_dir), "checkpoint": run.checkpoint.name, "mask": mask, "beam": beam,
                    "index": str(index.folder) if index is not None and index.folder else None,
                    "captions": [r.to_json() for r in results]})
        return
    for r in results:
        out.print(_table(r, mask))
