"""Checkpoints: each one a folder written whole under a temp name and then renamed.

``RUN/checkpoints/step-00000120/`` holds ``model.safetensors`` (the unwrapped model's weights),
``trainer.pt`` (optimizer, scheduler, scaler and RNG states; tensors and plain containers only,
read back with ``weights_only=True``) and ``state.json`` (step, epoch, position in the epoch).
``RUN/checkpoints/latest`` names the newest complete one.
"""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_model, save_model

from ssbctl.errors import DataError, UserError
from ssbctl.io import atomic_write_json, atomic_write_text, fresh_dir, replace_dir
from ssbctl.validate import field, read_json

CHECKPOINTS = "checkpoints"


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside DistributedDataParallel and/or ``torch.compile`` wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def save_checkpoint(run_dir: Path, model: nn.Module, trainer: dict[str, Any], state: dict[str, Any],
                    keep: int) -> Path:
    """Write a checkpoint for ``state["step"]``, point ``latest`` at it, prune old ones."""
    root = Path(run_dir) / CHECKPOINTS
    name = f"step-{state['step']:08d}"
    tmp = fresh_dir(root / f".{name}.tmp")
    save_model(unwrap_model(model), str(tmp / "model.safetensors"))
    torch.save(trainer, tmp / "trainer.pt")
    atomic_write_json(tmp / "state.json", state)
    replace_dir(tmp, root / name)
    atomic_write_text(root / "latest", name + "\n")
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return root / name


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    root = Path(run_dir) / CHECKPOINTS
    pointer = root / "latest"
    if pointer.is_file():
        path = root / pointer.read_text().strip()
        if (path / "state.json").is_file():
            return path
    done = sorted(p for p in root.glob("step-*") if (p / "state.json").is_file())
    return done[-1] if done else None


def find_checkpoint(run_dir: Path, name: str | None = None) -> Path:
    """A named checkpoint (``step-00000100``, a step number, or a path), else the latest."""
    if name:
        for path in (Path(name), Path(run_dir) / CHECKPOINTS / name,
                     Path(run_dir) / CHECKPOINTS / f"step-{int(name):08d}" if name.isdigit() else None):
            if path is not None and (path / "model.safetensors").is_file():
                return path
        raise UserError(f"checkpoint '{name}' not found in {run_dir}")
    found = latest_checkpoint(run_dir)
    if found is None:
        raise UserError(f"{run_dir} has no checkpoint")
    return found


def load_weights(model: nn.Module, checkpoint: Path) -> None:
    """Load ``model.safetensors`` into the unwrapped model (all keys and shapes must match).

    A missing or damaged file, or weights of another architecture, is a DataError."""
    from safetensors import SafetensorError

    path = Path(checkpoint) / "model.safetensors"
    if not path.is_file():
        raise DataError(f"{path} is missing")
    try:
        missing, unexpected = load_model(unwrap_model(model), str(path), strict=False)
    except (SafetensorError, OSError) as exc:
        raise DataError(f"{path} is damaged: {_first_line(exc)}") from None
    except RuntimeError as exc:  # shapes or dtypes differ
        raise DataError(f"{path}: weights do not fit the model ({str(exc).splitlines()[-1].strip()})") from None
    if missing or unexpected:
        raise DataError(f"{path}: weights do not fit the model (missing {sorted(missing)[:3]}, "
                        f"unexpected {sorted(unexpected)[:3]})")


def load_trainer_state(checkpoint: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The optimizer/scheduler/scaler/RNG states and ``state.json`` of a checkpoint.

    ``trainer.pt`` is read with ``weights_only=True``: tensors and plain containers only, so a
    pickle that would run code is refused, not run. Anything unreadable is a DataError."""
    path = Path(checkpoint) / "trainer.pt"
    if not path.is_file():
        raise DataError(f"{path} is missing")
    try:
        trainer = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # weights_only refused what it holds (without running any of it)
        raise DataError(f"{path} is damaged or not a checkpoint: it holds something other than tensors "
                        f"and plain containers (refused unread)") from None
    except Exception as exc:  # noqa: BLE001 - any failure to parse this file means it is damaged
        raise DataError(f"{path} is damaged or not a checkpoint ({_first_line(exc)})") from None
    if not isinstance(trainer, dict):
        raise DataError(f"{path}: expected a dict of states, got {type(trainer).__name__}")
    for key in ("optimizer", "scheduler", "scaler"):
        field(trainer, key, dict, str(path))
    field(trainer, "rng", list, str(path))
    state = read_json(Path(checkpoint) / "state.json")
    field(state, "trainer", dict, str(Path(checkpoint) / "state.json"))
    return trainer, state


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__
