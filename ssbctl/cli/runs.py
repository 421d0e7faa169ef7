"""``ssbctl runs [FOLDER]``: the training runs under a folder, with their last checkpoint, what
they train (data and model) and their best validation numbers (read from ``metrics.jsonl``).

A run whose files cannot be read (a damaged recipe, metrics file or checkpoint pointer) is
listed as damaged with the reason; it never stops the listing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from ssbctl.cli.common import JsonOption, out, print_json

EPILOG = """Examples:

  ssbctl runs                                   # the runs under ./runs

  ssbctl runs . --json | jq '.[] | select(.status == "ok") | .best.t2v.R1'   # runs anywhere below here
"""

MAX_DEPTH = 3  # runs/GROUP/RUN: folders this deep below FOLDER are searched


def is_run(folder: Path) -> bool:
    """Whether ``folder`` is (or was meant to be) a run folder: marked as one by ssbctl, or holding
    a run's files (a damaged run is still a run)."""
    from ssbctl.core.io import folder_kind

    try:
        if folder_kind(folder) == "run":
            return True
        return any((folder / name).exists() for name in ("recipe.toml", "metrics.jsonl", "checkpoints"))
    except OSError:
        return False


def find_runs(folder: Path, depth: int = MAX_DEPTH) -> list[Path]:
    """``folder`` itself if it is a run, else the runs below it (sorted; hidden folders skipped)."""
    if is_run(folder):
        return [folder]
    if depth <= 0:
        return []
    try:
        children = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return []
    return [run for child in children for run in find_runs(child, depth - 1)]


def best_eval(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The validation row with the best text-to-video (R@1, R@5, R@10), as ``{"step", "epoch",
    "split", "t2v", "v2t"}``; None when the run has not validated yet."""
    evals = [r for r in rows if isinstance(r.get("eval"), dict) and isinstance(r["eval"].get("t2v"), dict)]
    if not evals:
        return None

    def key(row: dict[str, Any]) -> tuple[float, ...]:
        t2v = row["eval"]["t2v"]
        return tuple(float(t2v.get(k) or 0.0) for k in ("R1", "R5", "R10"))

    best = max(evals, key=key)
    result = best["eval"]
    return {"step": best.get("step"), "epoch": best.get("epoch"), "split": result.get("split"),
            "t2v": result.get("t2v"), "v2t": result.get("v2t")}


def describe(run: Path) -> dict[str, Any]:
    """One run's summary; ``status`` is ``damaged`` (with ``problem``) when a file cannot be read."""
    row: dict[str, Any] = {"run": str(run), "status": "ok", "problem": None, "recipe": None, "data": None,
                           "model": None,
                           "checkpoint": None, "step": None, "best": None}
    try:
        _fill(run, row)
    except Exception as exc:  # noqa: BLE001 - one unreadable run is reported, never the end of the listing
        row["status"], row["problem"] = "damaged", " ".join(str(exc).split())[:300] or type(exc).__name__
    return row


def _fill(run: Path, row: dict[str, Any]) -> None:
    """Read ``run``'s recipe, latest checkpoint and metrics into ``row`` (raises on damage)."""
    from ssbctl.core.io import read_jsonl
    from ssbctl.core.validate import read_json
    from ssbctl.engine.checkpoint import latest_checkpoint
    from ssbctl.engine.run import read_run_recipe, read_run_source

    recipe = read_run_recipe(run)
    row["recipe"] = read_run_source(run)
    row["data"], row["model"] = recipe.data.prepared, recipe.model.name or None
    checkpoint = latest_checkpoint(run)
    if checkpoint is not None:
        state = read_json(checkpoint / "state.json", dict)
        row["checkpoint"], row["step"] = checkpoint.name, state.get("step")
    metrics = run / "metrics.jsonl"
    if metrics.exists():
        rows = list(read_jsonl(metrics))
        row["best"] = best_eval(rows)
        if row["step"] is None and rows:
            row["step"] = rows[-1].get("step")


def _best_text(best: dict[str, Any] | None) -> str:
    if not best:
        return "-"
    t2v = best["t2v"]
    return (f"{best.get('split')} t2v R@1 {t2v.get('R1', 0):.1f} R@5 {t2v.get('R5', 0):.1f} "
            f"R@10 {t2v.get('R10', 0):.1f} (step {best.get('step')})")


def runs(
    folder: Annotated[Path, typer.Argument(
        help="A folder of runs (searched 3 levels deep), or one run.")] = Path("runs"),
    as_json: JsonOption = False,
) -> None:
    """List the training runs under FOLDER: last checkpoint, recipe, data and model, best validation numbers."""
    from ssbctl.core.errors import UserError

    folder = folder.expanduser()
    if not folder.is_dir():
        raise UserError(f"no folder {folder}; give the folder that holds your runs (ssbctl runs FOLDER)")
    rows = [describe(run) for run in find_runs(folder)]
    if as_json:
        print_json(rows)
        return
    if not rows:
        out.print(f"no runs under {folder}", markup=False, highlight=False)
        return
    columns = ("run", "status", "checkpoint", "recipe", "data", "model", "best validation")
    cells = [[r["run"], r["status"] if r["problem"] is None else f"damaged: {r['problem']}", r["checkpoint"] or "-",
              r["recipe"] or "-", r["data"] or "-", r["model"] or "-", _best_text(r["best"])] for r in rows]
    if not out.is_terminal:  # a pipe or a file: whole values, tab-separated, a header line first
        for line in (list(columns), *cells):
            print("\t".join(line))  # print: rich would expand the tabs
        return
    table = Table(title=f"runs under {folder}")
    for column in columns:
        table.add_column(column, overflow="fold")
    for cell in cells:
        table.add_row(*cell)
    out.print(table)
