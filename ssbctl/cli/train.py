"""``ssbctl train``: train a recipe into a run folder, or resume one."""

from __future__ import annotations

import os
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated

import typer

from ssbctl.cli.common import JsonOption, RichReporter, at_least, err, metrics_table, out, print_json

EPILOG = """Examples:

  ssbctl train --recipe shapes --set train.epochs=3

  ssbctl train --recipe recipes/shapes.toml --set model.support.mask=none --out runs/baseline

  ssbctl train --resume --out runs/shapes              # continue from the latest checkpoint

  ssbctl train --recipe shapes --nproc 2 --out runs/shapes-2p   # torchrun --standalone --nproc_per_node 2 ...
"""


def train(
    ctx: typer.Context,
    recipe: Annotated[str | None, typer.Option(help="Recipe name (shapes) or TOML path.")] = None,
    overrides: Annotated[list[str] | None, typer.Option(
        "--set", help="Override a recipe key: train.lr=3e-4 (repeatable).")] = None,
    output: Annotated[Path | None, typer.Option(
        "--out", help="Run folder (default: the recipe's train.output_dir).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its latest checkpoint.")] = False,
    nproc: Annotated[int, typer.Option(
        help="Launch this many processes with torchrun (one per GPU, or gloo on CPU).",
        callback=at_least(1, "--nproc"))] = 1,
    build_index: Annotated[bool, typer.Option(
        "--index/--no-index", help="When training completes, index the test split's videos (else the evaluation "
                                   "split's) into RUN/index, which `ssbctl retrieve` then searches.")] = True,
    as_json: JsonOption = False,
) -> None:
    """Train the SSB model on prepared data; checkpoints, metrics.jsonl and the resolved recipe go to the run folder.

    train.batch_size is the global batch (the support set and the negatives); each of N processes takes 1/N of it."""
    from rich.markup import escape

    from ssbctl.cli.torchrun import launch_torchrun
    from ssbctl.core.distributed import DistInfo
    from ssbctl.core.io import check_output, lock_env, output_lock, output_path
    from ssbctl.engine.train_setup import preflight, resolve_recipe
    from ssbctl.training import train as run_training

    _note_shipped_recipe(recipe)
    resolved, run_dir = resolve_recipe(recipe, overrides or [], output, resume)
    run_dir = output_path(run_dir)
    if not resume:
        check_output(run_dir, "run")  # a fresh run writes into --out: only a new, empty or run folder
    if nproc > 1:  # a user error is reported once, before any worker starts
        preflight(resolved, run_dir, resume, nproc)
        with output_lock(run_dir) as lock:  # the launcher holds the run's lock for the processes it starts
            raise typer.Exit(launch_torchrun(nproc, _command_line(ctx), env=lock_env([lock])))
    main_process = int(os.environ.get("RANK", "0")) == 0  # under torchrun rank 0 alone takes the lock
    with output_lock(run_dir) if main_process else nullcontext():
        summary = run_training(resolved, run_dir, resume=resume, reporter=RichReporter(),  # leaves the process group
                               source=None if resume else recipe)
    if not DistInfo(rank=summary["rank"]).is_main:
        return
    if build_index and not summary["stopped_by"]:
        from ssbctl.core.errors import DataError, UserError

        try:
            summary["index"] = _index_test_videos(run_dir, resolved.train.device)
        except (UserError, DataError) as exc:  # the run is trained and saved whatever happens here
            err.print(escape(f"warning: the test videos were not indexed ({exc}); index them with: "
                             f"ssbctl index {run_dir} --split test --out {run_dir / 'index'}"))
    if as_json:
        print_json(summary)
        return
    if summary["eval"]:
        out.print(metrics_table(summary["eval"], f"{summary['eval']['split']} split, step {summary['steps']}"))
    how = f" (stopped by {summary['stopped_by']}; continue with --resume)" if summary["stopped_by"] else ""
    out.print(escape(f"trained {summary['steps']} steps -> {run_dir}{how}\n"
                     f"next: ssbctl evaluate {run_dir} --split test"))
    if summary.get("index"):
        built = summary["index"]
        out.print(escape(f"indexed the {built['videos']} {built['split']} videos -> {built['index']}\n"
                         f"search them: ssbctl retrieve --query \"...\" (the default index until another is built)"))


def _command_line(ctx: typer.Context) -> list[str]:
    """The arguments this ``ssbctl`` invocation was given (``main(argv)``'s, else ``sys.argv``'s)."""
    import sys

    obj = ctx.find_root().obj
    return list(obj["argv"]) if isinstance(obj, dict) and "argv" in obj else sys.argv[1:]


def _note_shipped_recipe(recipe: str | None) -> None:
    """Say on stderr when a ``recipes/NAME.toml`` path that is not here stands for the shipped recipe NAME."""
    from ssbctl.core.paths import shipped_configs

    if recipe is None or not (recipe.endswith(".toml") or os.sep in recipe):
        return
    path = Path(recipe).expanduser()
    shipped = shipped_configs("recipes").get(path.stem)
    if not path.is_file() and path.parent.name == "recipes" and shipped is not None \
            and int(os.environ.get("RANK", "0")) == 0:
        from rich.markup import escape

        err.print(escape(f"{recipe} is not in {Path.cwd()}; using the shipped recipe '{path.stem}' ({shipped})"))


def _index_test_videos(run_dir: Path, device: str) -> dict[str, object] | None:
    """Index the run's test videos (the evaluation split's when there is no test split) into
    ``RUN/index`` and name it as the last run's index, which ``retrieve`` searches by default."""
    from ssbctl.core.io import atomic_write_text
    from ssbctl.core.paths import run_index_pointer
    from ssbctl.data.store import open_stores
    from ssbctl.inference.run import load_run
    from ssbctl.retrieval.build import index_store

    loaded = load_run(run_dir, None, device)
    store = open_stores(loaded.recipe.data.prepared, loaded.recipe.data.experts)
    splits = {v["split"] for v in store.videos}
    split = "test" if "test" in splits else loaded.recipe.data.eval_split
    if split not in splits:
        return None
    target = Path(run_dir) / "index"
    index_store(loaded, store, [split]).save(target)
    pointer = run_index_pointer()
    pointer.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(pointer, str(target.resolve()) + "\n")
    return {"index": str(target), "split": split, "videos": sum(1 for v in store.videos if v["split"] == split)}
