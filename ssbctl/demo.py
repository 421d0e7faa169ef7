"""The whole pipeline offline on the synthetic ``shapes`` dataset: prepare, train, evaluate, index."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ssbctl.config import load_recipe
from ssbctl.core.errors import UserError
from ssbctl.core.io import check_output, mark_kind
from ssbctl.core.validate import read_json
from ssbctl.data.backbones import build_backbone
from ssbctl.data.datasets.shapes import ShapesSpec
from ssbctl.data.prepare import dataset_items, prepare_items
from ssbctl.data.store import FeatureStore
from ssbctl.data.video import Sampling
from ssbctl.engine.trainer import Reporter
from ssbctl.evaluation.evaluate import evaluate_split
from ssbctl.inference.run import load_run
from ssbctl.retrieval.build import index_store
from ssbctl.training import train

EXAMPLE_QUERIES = (
    "a red circle moves to the left",
    "a big blue square spins",
    "a small yellow triangle falls",
    "a green cross moves towards the white box",
)

Progress = Callable[[int, int], None]


def _check_index_is_the_demos(index_dir: Path, run_dir: Path, data_dir: Path) -> None:
    """The demo rewrites ``index_dir``. An index there that holds anything but an earlier demo's
    videos (a user's own, indexed without ``--out``, by another run or added to the demo's) is
    refused before any work instead of being replaced."""
    meta_file = index_dir / "index.json"
    if not meta_file.is_file():
        return
    meta = read_json(meta_file)
    sources = set(meta.get("sources") or [meta.get("source")])
    if meta.get("run") != str(run_dir.resolve()) or sources != {str(data_dir.resolve())}:
        where = ", ".join(sorted(str(s) for s in sources))
        raise UserError(f"{index_dir} holds {meta.get('count', 'the')} videos indexed from {where}, which the "
                        "demo would replace; move that index elsewhere (or run the demo under another "
                        "$SSBCTL_HOME) first")


@dataclass
class DemoResult:
    """What the demo produced."""

    run_dir: Path
    index_dir: Path
    data_dir: Path
    metrics: dict[str, Any]
    queries: dict[str, list[dict[str, Any]]]


def run_demo(out: Path, index_dir: Path, spec: ShapesSpec, overrides: list[str],
             reporter: Reporter | None = None, progress: Callable[[str], Any] | None = None,
             data_dir: Path | None = None) -> DemoResult:
    """Generate shapes clips under ``out``, prepare them into ``data_dir``, train the shapes recipe
    into ``out/run``, evaluate on test, index, query.

    ``data_dir`` defaults to ``out/data``; the CLI passes ``$SSBCTL_HOME/data/shapes-pixels``, where
    ``ssbctl prepare shapes`` writes and the shapes recipe looks, so that ``ssbctl train --recipe
    shapes`` trains on the demo's data afterwards.
    ``progress(stage)`` returns a context manager yielding ``update(done, total)`` (or None).
    ``out`` must be new, empty or an earlier demo folder, ``data_dir`` new, empty or a store, and
    ``index_dir`` new, empty or an index: the demo rewrites them, so anything else is refused
    before any work.
    """
    data_dir = data_dir or out / "data"
    check_output(out, "demo")
    check_output(data_dir, "store")
    check_output(index_dir, "index")
    _check_index_is_the_demos(index_dir, out / "run", data_dir)
    out.mkdir(parents=True, exist_ok=True)
    mark_kind(out, "demo")
    stage = progress or (lambda _name: nullcontext())
    with stage("generate clips") as update:
        items = dataset_items("shapes", out / "raw", None, spec, update)
    with stage("prepare") as update:
        prepare_items(items, data_dir, "shapes", build_backbone("pixels"), Sampling(), update)
    run_dir = out / "run"
    shutil.rmtree(run_dir, ignore_errors=True)  # the demo's own run: always trained afresh
    recipe = load_recipe("shapes", [f'data.prepared="{data_dir}"', f'train.output_dir="{run_dir}"',
                                    *overrides])
    train(recipe, run_dir, reporter=reporter)
    loaded = load_run(run_dir, device=recipe.train.device)
    store = FeatureStore(data_dir)
    metrics = evaluate_split(loaded.model, loaded.tokenizer, store, "test", loaded.device)
    index = index_store(loaded, store)
    index.save(index_dir)
    queries = loaded.encode_text(list(EXAMPLE_QUERIES))
    hits = dict(zip(EXAMPLE_QUERIES, index.search(queries, k=3)))
    return DemoResult(run_dir, index_dir, data_dir, metrics, hits)
