"""``ssbctl retrieve``: the top-k videos of an index for a text query."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from ssbctl.cli.common import DeviceOption, IndexOption, JsonOption, out, print_json

EPILOG = """Examples:

  ssbctl retrieve --query "a red circle moves to the left"

  ssbctl retrieve --query "a man cooks" --index my-index -k 10 --json
"""


def retrieve(
    query: Annotated[str, typer.Option("--query", "-q", help="Text to search for.")],
    index_dir: IndexOption = None,
    k: Annotated[int, typer.Option("-k", help="How many videos.")] = 5,
    device: DeviceOption = "auto",
    as_json: JsonOption = False,
) -> None:
    """Search an index by text (the demo's index when none is named)."""
    from ssbctl.engine.run import load_run
    from ssbctl.errors import UserError
    from ssbctl.evaluation.evaluate import embed_texts
    from ssbctl.paths import default_index
    from ssbctl.retrieval.index import Index

    if k < 1:
        raise UserError("-k must be at least 1")
    if not query.strip():
        raise UserError("--query is empty")
    idx = Index.load(index_dir or default_index())
    loaded = load_run(idx.meta["run"], idx.meta.get("checkpoint"), device)
    hits = idx.search(embed_texts(loaded.model, loaded.tokenizer, [query], loaded.device), k)[0]
    if as_json:
        print_json(hits)
        return
    table = Table(title=f"top {len(hits)} for {query!r}")
    for col in ("rank", "video_id", "score", "path"):
        table.add_column(col, justify="right" if col in ("rank", "score") else "left")
    for h in hits:
        table.add_row(str(h["rank"]), h["video_id"], f"{h['score']:.3f}", h["path"])
    out.print(table)
