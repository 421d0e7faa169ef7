"""``ssbctl index``: embed prepared videos with a trained run into a search index."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ssbctl.cli.common import CheckpointOption, DeviceOption, JsonOption, out, print_json

EPILOG = """Examples:

  ssbctl index runs/shapes                      # the run's prepared data, all splits

  ssbctl index runs/shapes --data shapes --split test --out my-index
"""


def index(
    run: Annotated[Path, typer.Argument(help="Run folder written by `ssbctl train`.")],
    data: Annotated[str | None, typer.Option(help="Prepared data to index (default: the run's).")] = None,
    split: Annotated[list[str] | None, typer.Option(help="Only these splits (repeatable; default: all).")] = None,
    output: Annotated[Path | None, typer.Option("--out", help="Index folder (default: $SSBCTL_HOME/index).")] = None,
    checkpoint: CheckpointOption = None,
    device: DeviceOption = "auto",
    as_json: JsonOption = False,
) -> None:
    """Build an index folder: normalised video embeddings, ids and source paths."""
    from ssbctl.engine.run import load_run
    from ssbctl.paths import default_index, open_stores
    from ssbctl.retrieval.build import index_store

    loaded = load_run(run, checkpoint, device)
    store = open_stores(data or loaded.recipe.data.prepared, loaded.recipe.data.experts)
    built = index_store(loaded, store, split or None)
    target = output or default_index()
    built.save(target)
    summary = {"index": str(target), "videos": len(built.videos), "dim": int(built.embeddings.shape[1])}
    if as_json:
        print_json(summary)
    else:
        out.print(f"indexed {summary['videos']} videos -> {target}")
