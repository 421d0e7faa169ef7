"""Choosing the recipe and run folder for a training command (fresh or resumed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ssbctl.config import Recipe, deep_merge, load_recipe, parse_override, recipe_from_dict, to_dict
from ssbctl.core.errors import UserError
from ssbctl.engine.run import read_run_recipe


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
    from ssbctl.data.store import open_stores
    from ssbctl.engine.checkpoint import latest_checkpoint
    from ssbctl.engine.trainer import check_training_batch

    store = open_stores(recipe.data.prepared, recipe.data.experts)
    store.split_videos(recipe.data.train_split)
    store.split_captions(recipe.data.train_split)
    check_training_batch(recipe, store, world)
    found = latest_checkpoint(run_dir)
    if resume and found is None:
        raise UserError(f"nothing to resume: {run_dir} has no checkpoint")
    if not resume and found is not None:
        raise UserError(f"{run_dir} already has checkpoints; pass --resume to continue it or choose another --out")
