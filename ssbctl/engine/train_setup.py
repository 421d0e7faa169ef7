"""Choosing the recipe and run folder for a training command (fresh or resumed)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from ssbctl.config import Recipe, deep_merge, load_recipe, parse_override, recipe_from_dict, to_dict
from ssbctl.engine.run import read_run_recipe
from ssbctl.errors import UserError


def resolve_recipe(recipe: str | None, overrides: list[str], output: Path | None,
                   resume: bool) -> tuple[Recipe, Path]:
    """The recipe to train and the run folder.

    Fresh: the named recipe with overrides; the folder is ``--out`` or ``train.output_dir``.
    Resume: the run's own resolved recipe with overrides on top (to extend ``train.epochs``,
    say), so a resumed run never silently switches recipe.
    """
    if resume:
        run_dir = output or (Path(load_recipe(recipe).train.output_dir) if recipe else None)
        if run_dir is None:
            raise UserError("--resume needs --out RUN (or the --recipe whose output_dir to continue)")
        run_recipe = read_run_recipe(run_dir)
        raw = to_dict(run_recipe)
        for item in overrides:
            raw = deep_merge(raw, parse_override(item))
        resumed = recipe_from_dict(raw, resolve_model=False)
        _refuse_model_changes(to_dict(run_recipe.model), to_dict(resumed.model), "model.")
        return resumed, Path(run_dir)
    if recipe is None:
        raise UserError("--recipe is required (a name such as 'shapes', or a TOML file)")
    loaded = load_recipe(recipe, overrides)
    return loaded, Path(output or loaded.train.output_dir)


def _refuse_model_changes(run: dict[str, Any], asked: dict[str, Any], prefix: str) -> None:
    """A resumed run keeps its architecture (its checkpoints fit no other): an override that would
    change a ``model.*`` key is a UserError naming the key, never silently ignored."""
    for key, value in asked.items():
        if isinstance(value, dict):
            _refuse_model_changes(run[key], value, f"{prefix}{key}.")
        elif value != run[key]:
            raise UserError(f"recipe key '{prefix}{key}' cannot change when resuming (the run has "
                            f"{run[key]!r}, asked {value!r}); train a new run with --out instead")


def preflight(recipe: Recipe, run_dir: Path, resume: bool, world: int) -> None:
    """What a training command can get wrong, checked in the launcher before ``--nproc`` spawns
    ``world`` workers (each would otherwise fail alike): the prepared data, its training split and
    whether ``world`` processes can share its global batch, and whether the run folder has a
    checkpoint to resume (or none to clobber)."""
    from ssbctl.engine.checkpoint import latest_checkpoint
    from ssbctl.engine.trainer import check_training_batch
    from ssbctl.paths import open_stores

    store = open_stores(recipe.data.prepared, recipe.data.experts)
    store.split_videos(recipe.data.train_split)
    store.split_captions(recipe.data.train_split)
    check_training_batch(recipe, store, world)
    found = latest_checkpoint(run_dir)
    if resume and found is None:
        raise UserError(f"nothing to resume: {run_dir} has no checkpoint")
    if not resume and found is not None:
        raise UserError(f"{run_dir} already has checkpoints; pass --resume to continue it or choose another --out")


def launch_torchrun(nproc: int, argv: list[str] | None = None, env: dict[str, str] | None = None) -> int:
    """Run this same ``ssbctl train`` command under ``torchrun --standalone`` with ``nproc`` workers
    (``env``: variables to add to theirs); a worker's error is reported once (ssbctl.engine.torchrun)."""
    if "WORLD_SIZE" in os.environ:
        raise UserError("--nproc is for launching; under torchrun already, drop it")
    args = list(sys.argv[1:] if argv is None else argv)
    cleaned, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            cleaned.append(a)
    cmd = [sys.executable, "-m", "ssbctl.engine.torchrun", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "ssbctl", *cleaned]
    # Its own session: a Ctrl-C reaches the workers once, through the forwarding below.
    proc = subprocess.Popen(cmd, start_new_session=True, env={**os.environ, **(env or {})})

    def forward(signum: int, _frame: object) -> None:
        _signal_workers(proc.pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _signal_workers(launcher_pid: int, signum: int) -> None:
    """Send ``signum`` to torchrun's workers, which checkpoint and exit 0, so torchrun exits 0.

    Signalling torchrun itself would also stop them, but torchrun then exits 1 with a
    traceback. Before the workers exist (or without Linux's /proc) torchrun gets the signal."""
    workers: list[int] = []
    for children in Path(f"/proc/{launcher_pid}/task").glob("*/children"):
        try:
            workers += [int(pid) for pid in children.read_text().split()]
        except OSError:
            continue
    for pid in workers or [launcher_pid]:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass
