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

  echo "a man cooks" | ssbctl retrieve -q - > hits.tsv               # stdin query; TSV file

On a terminal the results are tables. When stdout is not a terminal (a pipe, a file) they are
tab-separated values with a header line, one row per result, nothing cut: columns query, rank,
video_id, split, caption (when the index knows captions), score, ds_score (with --dual-softmax),
path; tabs and line breaks inside a value become spaces. --json prints one JSON document instead.
"""


def _stdin() -> str:
    """All of standard input (a terminal is refused: the command would wait for typing)."""
    from ssbctl.core.errors import UserError

    if sys.stdin is None or sys.stdin.isatty():
        raise UserError("'-' reads standard input, which is a terminal here; pipe the text in "
                        "(echo \"a man cooks\" | ssbctl retrieve -q -)")
    return sys.stdin.read()


def _lines(path: Path) -> list[str]:
    """Non-blank lines of a UTF-8 text file (``-``: stdin), stripped."""
    from ssbctl.core.errors import UserError

    if str(path) == "-":
        text = _stdin()
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


VIDEO_COLUMNS = ("rank", "video_id", "split", "caption", "score", "ds_score", "weight", "path")
CAPTION_COLUMNS = ("rank", "caption", "score")
WIDE = ("video_id", "caption", "path")  # folded onto more lines in a table, never cut


def _columns(hits: list[dict[str, Any]], known: tuple[str, ...]) -> list[str]:
    """The columns of ``known`` that some hit has, in that order."""
    return [c for c in known if any(c in h for h in hits)]


def _cell(value: Any, tsv: bool) -> str:
    """A value as text: floats to a fixed precision, None empty; in TSV no tab or line break."""
    if value is None:
        return ""
    text = f"{value:.6f}" if tsv and isinstance(value, float) else f"{value:.3f}" if isinstance(value, float) \
        else str(value)
    return " ".join(text.split("\t")).replace("\r", " ").replace("\n", " ") if tsv else text


def _table(title: str, hits: list[dict[str, Any]], known: tuple[str, ...] = VIDEO_COLUMNS) -> Table:
    """Hits as a table; every value is shown as text (a path or query with [brackets] stays
    literal) and long ones wrap instead of being cut."""
    table = Table(title=escape(title))
    cols = _columns(hits, known)
    for col in cols:
        table.add_column(col, justify="right" if col in ("rank", "score", "ds_score", "weight") else "left",
                         overflow="fold" if col in WIDE else "ellipsis")
    for h in hits:
        table.add_row(*(escape(_cell(h.get(c), tsv=False)) for c in cols))
    return table


def _tsv(groups: list[tuple[str, list[dict[str, Any]]]], known: tuple[str, ...]) -> str:
    """Results as tab-separated values for scripts: a header, then one row per hit with its query."""
    cols = _columns([h for _, hits in groups for h in hits], known)
    lines = ["\t".join(["query", *cols])]
    lines += ["\t".join([_cell(q, tsv=True), *(_cell(h.get(c), tsv=True) for c in cols)])
              for q, hits in groups for h in hits]
    return "\n".join(lines) + "\n"


def _show(groups: list[tuple[str, list[dict[str, Any]]]], known: tuple[str, ...], titles: list[str]) -> None:
    """Tables on a terminal; TSV when stdout is a pipe or a file (nothing truncated)."""
    if out.is_terminal:
        for title, (_, hits) in zip(titles, groups):
            out.print(_table(title, hits, known))
    else:
        sys.stdout.write(_tsv(groups, known))
        sys.stdout.flush()


def _check_flags(query: str | None, queries: Path | None, video: Path | None, caption_bank: Path | None,
                 sheet: Path | None, explain: Path | None, dual_softmax: Path | None, backend: str, k: int) -> None:
    """Refuse, before any work, flags that conflict or that this combination would ignore."""
    from ssbctl.core.errors import UserError

    if k < 1:
        raise UserError("-k must be at least 1")
    if query is not None and queries is not None:
        raise UserError("give --query or --queries, not both")
    if (query is not None or queries is not None) == (video is not None):
        raise UserError("give --query/--queries or --video (one of them)")
    if caption_bank and not video:
        raise UserError("--caption-bank goes with --video")
    if dual_softmax is not None and video is not None:
        raise UserError("--dual-softmax re-ranks text queries; it does not apply to --video")
    if caption_bank is not None:
        for flag, value in (("--sheet", sheet), ("--explain", explain)):
            if value is not None:
                raise UserError(f"{flag} pictures videos, but --caption-bank ranks captions; drop {flag}")
        if backend != "exact":
            raise UserError("--backend searches the index; --caption-bank ranks the captions given, exactly")
    if backend not in ("exact", "faiss"):
        raise UserError(f"--backend must be exact or faiss, got {backend!r}")
    readers = [flag for flag, value in (("--query", query), ("--queries", queries), ("--caption-bank", caption_bank),
                                        ("--dual-softmax", dual_softmax)) if value is not None and str(value) == "-"]
    if len(readers) > 1:
        raise UserError(f"{' and '.join(readers)} both read standard input ('-'); give one of them a file")


def _texts(query: str | None, queries: Path | None) -> list[str]:
    """The text queries: ``--query`` (``-``: all of stdin, as one query) or ``--queries`` lines."""
    from ssbctl.core.errors import UserError

    if query is not None:
        text = " ".join(_stdin().split()) if query == "-" else query
        if not text.strip():
            raise UserError("--query is empty" + (" (nothing on standard input)" if query == "-" else ""))
        return [text]
    return _lines(queries) if queries is not None else []


def retrieve(
    query: Annotated[str | None, typer.Option(
        "--query", "-q", help="Text to search for ('-': read it from stdin).")] = None,
    queries: Annotated[Path | None, typer.Option(help="File with one query per line ('-' for stdin).")] = None,
    video: Annotated[Path | None, typer.Option(
        help="A video file: find similar videos (or captions, with --caption-bank).")] = None,
    caption_bank: Annotated[Path | None, typer.Option(help="With --video: rank these captions (one per line).")] = None,
    index_dir: IndexOption = None,
    k: Annotated[int, typer.Option("-k", help="How many results.")] = 5,
    sheet: Annotated[Path | None, typer.Option(
        help="Write a contact sheet PNG: each result as a strip of frames over time.")] = None,
    explain: Annotated[Path | None, typer.Option(
        help="Write the support-set attention heatmap PNG for the first query (with --json the weights "
             "are in the JSON too).")] = None,
    dual_softmax: Annotated[Path | None, typer.Option(
        "--dual-softmax", help="Re-rank text queries with dual softmax over this query bank (one per line).")] = None,
    backend: Annotated[str, typer.Option(
        help="exact (chunked scan) or faiss (approximate; see index --faiss).")] = "exact",
    device: DeviceOption = "auto",
    as_json: JsonOption = False,
) -> None:
    """Search an index by text or by video (the demo's index when none is named)."""
    from ssbctl.retrieval.search import Searcher

    _check_flags(query, queries, video, caption_bank, sheet, explain, dual_softmax, backend, k)
    texts = _texts(query, queries)
    bank = _lines(caption_bank) if caption_bank is not None else None
    rerank = _lines(dual_softmax) if dual_softmax is not None else None
    _check_output("--sheet", sheet)
    _check_output("--explain", explain)
    searcher = Searcher(index_dir, device)
    searcher.index.backend = backend
    if bank is not None and video is not None:  # (--caption-bank without --video is refused above)
        hits = searcher.captions_for_video(video, bank, k)
        if as_json:
            print_json(hits)
        else:
            _show([(str(video), hits)], CAPTION_COLUMNS, [f"captions for {video}"])
        return
    labels = texts or [str(video)]
    results = searcher.videos_for_video(video, k) if video else searcher.videos_for_texts(texts, k, rerank)
    if sheet:
        size = searcher.sheet(labels, results, k, sheet)
        err.print(escape(f"contact sheet {size[0]}x{size[1]} -> {sheet}"))
    attention = None
    if explain:
        def first_query() -> Any:  # only needed when -k 1 leaves a single result
            return searcher.encode_texts(texts[:1]) if texts else searcher.run.encode_video([Path(labels[0])])

        attention = {"png": str(explain), **searcher.explain(labels[0], results[0], first_query, explain)}
        err.print(escape(f"support-set attention heatmap -> {explain}"))
    if as_json:
        _print_results_json(labels, results, attention, single=query is not None or video is not None)
        return
    _show(list(zip(labels, results)), VIDEO_COLUMNS, [f"top {len(hits)} for {label!r}" for label, hits in
                                                       zip(labels, results)])
    if attention is not None:
        draws = _table("the top result draws on (rank: its retrieval rank)", attention["draws_on"],
                       ("rank", "video_id", "weight"))
        (out if out.is_terminal else err).print(draws)


def _print_results_json(labels: list[str], results: list[list[dict[str, Any]]], attention: dict[str, Any] | None,
                        single: bool) -> None:
    """One query: its list of hits; several: a list of {query, results}. With --explain the
    attention goes in the JSON too: one query gives {query, results, explain}; with several, the
    first entry (the query explained) carries ``explain``."""
    if single and attention is None:
        print_json(results[0])
        return
    entries: list[dict[str, Any]] = [{"query": q, "results": r} for q, r in zip(labels, results)]
    entries[0]["explain"] = attention
    if attention is None:
        del entries[0]["explain"]
    print_json(entries[0] if single else entries)
