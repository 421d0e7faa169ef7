"""``ssbctl demo``: the whole pipeline offline on the built-in synthetic dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ssbctl.cli.common import JsonOption, RichReporter, at_least, metrics_table, out, print_json, progress_bar

EPILOG = """Examples:

  ssbctl demo                                   # then: ssbctl retrieve --query "a red ball slides left"

  ssbctl demo --num-videos 300 --set train.epochs=5
"""


def demo(
    output: Annotated[Path | None, typer.Option("--out", help="Demo folder (default: $SSBCTL_HOME/demo).")] = None,
    num_videos: Annotated[int, typer.Option(
        help="Synthetic clips to generate.", callback=at_least(1, "--num-videos"))] = 1000,
    seed: Annotated[int, typer.Option(help="Seed of the data and of training.")] = 0,
    overrides: Annotated[list[str] | None, typer.Option("--set", help="Override a key of the shapes recipe.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Generate shapes clips, prepare them as `prepare shapes` does, train, evaluate, index, run example queries."""
    from ssbctl.core.io import output_lock, output_path
    from ssbctl.core.paths import default_index, home
    from ssbctl.data.datasets.shapes import ShapesSpec
    from ssbctl.demo import run_demo

    folder, index_dir = output_path(output or home() / "demo"), output_path(default_index())
    data_dir = output_path(home() / "data" / "shapes-pixels")  # where the shapes recipe looks
    with output_lock(folder), output_lock(data_dir), output_lock(index_dir):
        result = run_demo(folder, index_dir, ShapesSpec(num_videos=num_videos, seed=seed),
                          [f"train.seed={seed}", *(overrides or [])], RichReporter(), progress_bar, data_dir)
    if as_json:
        print_json({"run": str(result.run_dir), "index": str(result.index_dir), "data": str(result.data_dir),
                    "test": result.metrics,
                    "queries": result.queries})
        return
    m = result.metrics
    out.print(metrics_table(m, f"shapes test split: {m['n_queries']} captions x {m['n_videos']} videos "
                               f"(chance R@5 = {500 / m['n_videos']:.1f}%)"))
    for query, hits in result.queries.items():
        table = Table(title=f"ssbctl retrieve --query {query!r}")
        for col in ("rank", "video_id", "score"):
            table.add_column(col)
        for h in hits:
            table.add_row(str(h["rank"]), h["video_id"], f"{h['score']:.3f}")
        out.print(table)
    out.print(f"run: {result.run_dir}\nindex: {result.index_dir}\ndata: {result.data_dir} "
              f"(`ssbctl train --recipe shapes` trains on it)\n"
              f"try: ssbctl retrieve --query \"a small green square shrinks\"")
