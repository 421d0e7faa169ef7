"""A run folder: its resolved recipe, its text-model description, and loading a trained model.

``RUN/recipe.toml`` is the complete recipe the run trained with (model config resolved, decoder
vocabulary size and input dims filled in); ``RUN/text_encoder/`` holds the tokenizer and the
text model's ``config.json`` (no weights: those are in each checkpoint), so a run loads without
the network and without the original pretrained files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ssbctl.config import Recipe, check_device_name, dump_toml, read_toml, recipe_from_dict, to_dict
from ssbctl.engine.checkpoint import find_checkpoint, load_weights
from ssbctl.errors import DataError, UserError
from ssbctl.io import atomic_write_json, atomic_write_text, check_output, fresh_dir, mark_kind, replace_dir
from ssbctl.model.ssb import SSBModel
from ssbctl.model.text_encoder import text_backbone_from_folder
from ssbctl.validate import field, read_json

if TYPE_CHECKING:
    from ssbctl.data.store import ExpertStores

RECIPE_FILE = "recipe.toml"
TEXT_DIR = "text_encoder"
EXPERTS_FILE = "experts.json"


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without it, or another device, is a user error."""
    check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("device 'cuda' requested but CUDA is not available")
    return torch.device(name)


def write_run_files(run_dir: Path, recipe: Recipe, tokenizer: Any, text_config: Any,
                    experts: list[dict[str, Any]]) -> None:
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
    write_recipe(run_dir, recipe)


def write_recipe(run_dir: Path, recipe: Recipe) -> None:
    """Save the resolved recipe, headed by the command that continues the run."""
    header = f"# Resolved recipe of this run. Continue it with:\n#   ssbctl train --resume --out {run_dir}"
    atomic_write_text(Path(run_dir) / RECIPE_FILE, dump_toml(to_dict(recipe), header))


def read_run_recipe(run_dir: Path) -> Recipe:
    """The resolved recipe a run was trained with."""
    path = Path(run_dir) / RECIPE_FILE
    if not path.is_file():
        raise UserError(f"{run_dir} is not a run folder (no {RECIPE_FILE})")
    return recipe_from_dict(read_toml(path), resolve_model=False)


def build_run_model(run_dir: Path, recipe: Recipe) -> tuple[SSBModel, Any]:
    """The run's architecture with untrained weights, and its tokenizer."""
    folder = Path(run_dir) / TEXT_DIR
    if not (folder / "config.json").is_file():
        raise DataError(f"{folder} is missing or incomplete (no config.json); the run cannot be loaded")
    try:
        backbone, tokenizer = text_backbone_from_folder(folder)
    except Exception as exc:  # noqa: BLE001 - tokenizers raises bare Exception for a damaged file
        raise DataError(f"{folder} is damaged: {str(exc).strip().splitlines()[0][:200]}") from None
    return SSBModel(recipe.model, recipe.loss, backbone, len(tokenizer)), tokenizer


@dataclass
class LoadedRun:
    """A trained model ready to embed videos and text."""

    run_dir: Path
    recipe: Recipe
    model: SSBModel
    tokenizer: Any
    checkpoint: Path
    device: torch.device

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Normalised embeddings ``(N, D)`` of texts."""
        from ssbctl.evaluation.evaluate import embed_texts

        return embed_texts(self.model, self.tokenizer, list(texts), self.device)

    def encode_video(self, paths: list[str | Path]) -> torch.Tensor:
        """Normalised embeddings ``(N, D)`` of video files (decoded and featurised as in training)."""
        from ssbctl.retrieval.videos import VideoEmbedder

        embedder = VideoEmbedder(self, workers=0)
        feats = []
        for i, f, reason, _ in embedder.features([Path(p) for p in paths]):
            if f is None:
                raise UserError(f"cannot read video {paths[i]}: {reason}")
            feats.append(f)
        return embedder.embed(feats)


def load_run(run_dir: str | Path, checkpoint: str | None = None, device: str = "auto") -> LoadedRun:
    """Load a run's model from its latest (or a named) checkpoint, in eval mode."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run folder not found: {run_dir}")
    recipe = read_run_recipe(run_dir)
    ckpt = find_checkpoint(run_dir, checkpoint)
    model, tokenizer = build_run_model(run_dir, recipe)
    load_weights(model, ckpt)
    dev = resolve_device(device)
    return LoadedRun(run_dir, recipe, model.to(dev).eval(), tokenizer, ckpt, dev)


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
