"""A run folder's files: its resolved recipe, its text-model description, its experts; building
the run's architecture (loading its weights is :func:`ssbctl.inference.load_run`).

``RUN/recipe.toml`` is the complete recipe the run trained with, as a user could write it (model
config resolved); ``RUN/run.json`` records what training derived and no recipe sets (input dims
from the prepared data, the decoder's vocabulary size); ``RUN/text_encoder/`` holds the tokenizer and the
text model's ``config.json`` (no weights: those are in each checkpoint), so a run loads without
the network and without the original pretrained files.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ssbctl.config import Recipe, deep_merge, dump_toml, read_toml, recipe_from_dict, split_recorded, to_dict
from ssbctl.core.errors import DataError, UserError
from ssbctl.core.io import atomic_write_json, atomic_write_text, check_output, fresh_dir, mark_kind, replace_dir
from ssbctl.core.validate import field, read_json
from ssbctl.model.ssb import SSBModel
from ssbctl.model.text_encoder import text_backbone_from_folder

if TYPE_CHECKING:
    from ssbctl.data.store import ExpertStores

RECIPE_FILE = "recipe.toml"
RECORD_FILE = "run.json"
RECORD_VERSION = 1
TEXT_DIR = "text_encoder"
EXPERTS_FILE = "experts.json"


def write_run_files(run_dir: Path, recipe: Recipe, tokenizer: Any, text_config: Any,
                    experts: list[dict[str, Any]], source: str | None = None) -> None:
    """Save the resolved recipe, the text model's tokenizer and config, and each expert's backbone
    and frame sampling (so the run can embed new videos without its prepared data).

    ``run_dir`` must be new, empty or a run: a run is written into, never into other files."""
    check_output(run_dir, "run")
    run_dir.mkdir(parents=True, exist_ok=True)
    mark_kind(run_dir, "run")
    atomic_write_json(run_dir / EXPERTS_FILE, experts)
    tmp = fresh_dir(run_dir / f".{TEXT_DIR}.tmp")
    tokenizer.save_pretrained(tmp)
    text_config.save_pretrained(tmp)
    replace_dir(tmp, run_dir / TEXT_DIR)
    write_recipe(run_dir, recipe, source)


def write_recipe(run_dir: Path, recipe: Recipe, source: str | None = None) -> None:
    """Save the resolved recipe (headed by the command that continues the run) and, apart from it,
    the values training recorded (``run.json``): the record first, so a recipe never lacks one.
    ``source`` is the recipe the run was started from (``--recipe``: a name or a file); None keeps
    the one recorded before (a resume)."""
    user, recorded = split_recorded(to_dict(recipe))
    source = source if source is not None else read_run_source(Path(run_dir))
    atomic_write_json(Path(run_dir) / RECORD_FILE, {"format_version": RECORD_VERSION, "recipe": source,
                                                    "recorded": recorded})
    header = f"# Resolved recipe of this run. Continue it with:\n#   ssbctl train --resume --out {run_dir}"
    atomic_write_text(Path(run_dir) / RECIPE_FILE, dump_toml(user, header))


def read_run_source(run_dir: Path) -> str | None:
    """The recipe (name or file) a run was started from, when its ``run.json`` records one."""
    record = Path(run_dir) / RECORD_FILE
    if not record.is_file():
        return None
    source = read_json(record, dict).get("recipe")
    return source if isinstance(source, str) else None


def read_run_recipe(run_dir: Path) -> Recipe:
    """The resolved recipe a run was trained with, its recorded values included. A run written
    before ``run.json`` existed kept them in its recipe.toml, which is read as it is."""
    path = Path(run_dir) / RECIPE_FILE
    if not path.is_file():
        raise UserError(f"{run_dir} is not a run folder (no {RECIPE_FILE})")
    raw = read_toml(path)
    record = Path(run_dir) / RECORD_FILE
    if record.is_file():
        data = read_json(record, dict)
        if data.get("format_version") != RECORD_VERSION:
            raise DataError(f"{record}: record format {data.get('format_version')!r} is not {RECORD_VERSION}; "
                            "upgrade ssbctl to read this run")
        raw = deep_merge(raw, field(data, "recorded", dict, str(record)))
    if isinstance(raw.get("loss"), dict):  # runs written before the key existed trained with the sum
        raw["loss"].setdefault("margin_reduction", "sum")
    return recipe_from_dict(raw, resolve_model=False)


def build_run_model(run_dir: Path, recipe: Recipe) -> tuple[SSBModel, Any]:
    """The run's architecture with untrained weights, and its tokenizer."""
    folder = Path(run_dir) / TEXT_DIR
    if not (folder / "config.json").is_file():
        raise DataError(f"{folder} is missing or incomplete (no config.json); the run cannot be loaded")
    try:
        backbone, tokenizer = text_backbone_from_folder(folder, projected=recipe.model.text.pooling == "projected")
    except Exception as exc:  # noqa: BLE001 - tokenizers raises bare Exception for a damaged file
        raise DataError(f"{folder} is damaged: {str(exc).strip().splitlines()[0][:200]}") from None
    return SSBModel(recipe.model, recipe.loss, backbone, len(tokenizer)), tokenizer


def read_expert_specs(run_dir: Path) -> list[dict[str, Any]]:
    """Backbone and sampling of each expert the run was trained on."""
    path = Path(run_dir) / EXPERTS_FILE
    if not path.is_file():
        raise UserError(f"{run_dir} has no {EXPERTS_FILE}; it cannot embed new videos")
    specs = read_json(path, list)
    for n, spec in enumerate(specs, 1):
        where = f"{path} expert {n}"
        if not isinstance(spec, dict):
            raise DataError(f"{where}: expected an object")
        field(field(spec, "backbone", dict, where), "name", str, where + " backbone")
        field(spec, "sampling", dict, where)
    return specs


def check_store_fits(run_dir: Path, recipe: Recipe, store: ExpertStores) -> None:
    """The run's video encoder takes features of the sizes it was trained on: a store of another
    backbone (another feature size or number of experts) is a UserError, not a shape error later."""
    trained = tuple(recipe.model.video.input_dims)
    if trained and tuple(store.feature_dims) != trained:
        raise UserError(f"{store.root} has features of size {list(store.feature_dims)} but {run_dir} was "
                        f"trained on {list(trained)}; use the prepared data of the run's backbone")
