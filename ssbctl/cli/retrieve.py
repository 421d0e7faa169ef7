"""``ssbctl retrieve``: top-k videos for text or a video, captions for a video, with pictures."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from ssbctl.cli.common import DeviceOption, IndexOption, JsonOption, err, out, print_json

EPILOG = """Examples:

  ssbctl retrieve --query "a red circle moves to the left"          # the demo's index

  ssbctl retrieve --query "a man cooks" --index my-index -k 10 --json

  ssbctl retrieve --queries queries.txt --sheet top.png              # one query per line ("-": stdin)

  ssbctl retrieve --video clip.mp4                                    # similar videos

  ssbctl retrieve --video clip.mp4 --caption-bank captions.txt       # best captions for a video

  ssbctl retrieve --query "a big blue box spins" --explain why.png   # support-set attention heatmap
"""


def _lines(path: Path) -> list[str]:
    """Non-blank lines of a UTF-8 text file (``-``: stdin), stripped."""
    from ssbctl.core.errors import UserError

    if str(path) == "-":
        text = sys.stdin.read()
    elif not path.is_file():
        raise UserError(f"file not found: {path}" if not path.exists() else f"{path} is not a file")
    else:
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UserError(f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path: Path) -> bool:
    """Whether ``path`` is a regular file that starts like a PNG (an earlier picture to replace)."""
    import os
    import stat

    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False
        with open(path, "rb") as fh:
            return fh.read(len(PNG_MAGIC)) == PNG_MAGIC
    except OSError:
        return False


def _check_output(option: str, path: Path | None) -> None:
    """An output picture must be a file path, new or an earlier PNG (checked before any work is
    done): any other existing file is the user's (a slip of tab completion), never overwritten."""
    import os

    from ssbctl.core.errors import UserError

    if path is None:
        return
    if path.is_dir() or path.parent.exists() and not path.parent.is_dir():
        raise UserError(f"{option} {path}: expected a PNG file path, not a folder")
    if os.path.lexists(path) and not _is_png(path):
        raise UserError(f"{option} {path} exists and is not a PNG picture; nothing was changed "
                        f"(choose another file name)")


def _table(title: str, hits: list[dict[str, Any]]) -> Table:
    """Hits as a table; every value is shown as text (a path or query with [brackets] stays literal)."""
    table = Table(title=escape(title))
    known = ("rank", "video_id", "caption", "score", "ds_score", "weight", "path")
    cols = [c for c in known if c in hits[0]] if hits else []
    for col in cols:
        table.add_column(col, justify="right" if col in ("rank", "score", "ds_score", "weight") else "left")
    for h in hits:
        table.add_row(*(f"{h[c]:.3f}" if isinstance(h[c], float) else escape(str(h[c])) for c in cols))
    return table


def retrieve(
    query: Annotated[str | None, typer.Option("--query", "-q", help="Text to search for.")] = None,
    queries: Annotated[Path | None, typer.Option(help="File with one query per line ('-' for stdin).")] = None,
    video: Annotated[Path | None, typer.Option(
        help="A video file: find similar videos (or captions, with --caption-bank).")] = None,
    caption_bank: Annotated[Path | None, typer.Option(help="With --video: rank these captions (one per line).")] = None,
    index_dir: IndexOption = None,
    k: Annotated[int, typer.Option("-k", help="How many results.")] = 5,
    sheet: Annotated[Path | None, typer.Option(help="Write a contact sheet PNG of the top-k thumbnails.")] = None,
    explain: Annotated[Path | None, typer.Option(
        help="Write the support-set attention heatmap PNG for the first query.")] = None,
    dual_softmax: Annotated[Path | None, typer.Option(
        "--dual-softmax", help="Re-rank with dual softmax over this query bank (one per line).")] = None,
    backend: Annotated[str, typer.Option(
        help="exact (chunked scan) or faiss (approximate; see index --faiss).")] = "exact",
    device: DeviceOption = "auto",
    as_json: JsonOption = False,
) -> None:
    """Search an index by text or by video (the demo's index when none is named)."""
    from ssbctl.core.errors import UserError
    from ssbctl.retrieval.search import Searcher

    if k < 1:
        raise UserError("-k must be at least 1")
    texts = [query] if query else (_lines(queries) if queries else [])
    if any(not t.strip() for t in texts):
        raise UserError("--query is empty")
    if bool(texts) == bool(video):
        raise UserError("give --query/--queries or --video (one of them)")
    if caption_bank and not video:
        raise UserError("--caption-bank goes with --video")
    if backend not in ("exact", "faiss"):
        raise UserError(f"--backend must be exact or faiss, got {backend!r}")
    _check_output("--sheet", sheet)
    _check_output("--explain", explain)
    searcher = Searcher(index_dir, device)
    searcher.index.backend = backend
    if caption_bank and video is not None:  # (--caption-bank without --video is refused above)
        hits = searcher.captions_for_video(video, _lines(caption_bank), k)
        print_json(hits) if as_json else out.print(_table(f"captions for {video}", hits))
        return
    labels = texts or [str(video)]
    results = searcher.videos_for_video(video, k) if video else searcher.videos_for_texts(
        texts, k, _lines(dual_softmax) if dual_softmax else None)
    if sheet:
        size = searcher.sheet(labels, results, k, sheet)
        err.print(escape(f"contact sheet {size[0]}x{size[1]} -> {sheet}"))
    if explain:
        table = searcher.explain(labels[0], texts[0] if texts else None, video, k, explain)
        if not as_json:
            out.print(_table(f"the top result draws on (support-set attention, heatmap -> {explain})", table))
    if as_json:
        print_json(results[0] if len(results) == 1 and (query or video) else
                   [{"query": q, "results": r} for q, r in zip(labels, results)])
        return
    for label, hits in zip(labels, results):
        out.print(_table(f"top {len(hits)} for {label!r}", hits))
