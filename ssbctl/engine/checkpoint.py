"""Checkpoints: each one a folder written whole under a temp name and then renamed.

``RUN/checkpoints/step-00000120/`` holds ``model.safetensors`` (the unwrapped model's weights),
``trainer.pt`` (optimizer, scheduler, scaler and RNG states, and the optimizer's parameter names per
group, so a resume matches its state by name; tensors and plain containers only,
read back with ``weights_only=True``) and ``state.json`` (step, epoch, position in the epoch).
``RUN/checkpoints/latest`` names the newest complete one: only a plain checkpoint name
(``step-`` and at least 8 digits) counts, never a path; anything else there is a DataError.
"""

from __future__ import annotations

import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_model, save_model

from ssbctl.core.errors import DataError, UserError
from ssbctl.core.io import apply_umask, atomic_write_json, atomic_write_text, fresh_dir, replace_dir
from ssbctl.core.validate import field, read_json

CHECKPOINTS = "checkpoints"
NAME = re.compile(r"step-[0-9]{8,}")  # what save_checkpoint names a checkpoint


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside DistributedDataParallel and/or ``torch.compile`` wrappers."""
    while True:
        for wrapped in ("module", "_orig_mod"):  # DDP's, then torch.compile's
            inner = getattr(model, wrapped, None)
            if isinstance(inner, nn.Module):
                model = inner
                break
        else:
            return model


def save_checkpoint(run_dir: Path, model: nn.Module, trainer: dict[str, Any], state: dict[str, Any],
                    keep: int) -> Path:
    """Write a checkpoint for ``state["step"]``, point ``latest`` at it, prune old ones."""
    root = Path(run_dir) / CHECKPOINTS
    name = f"step-{state['step']:08d}"
    tmp = fresh_dir(root / f".{name}.tmp")
    save_model(unwrap_model(model), str(tmp / "model.safetensors"))
    apply_umask(tmp / "model.safetensors")  # safetensors writes 0600
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
    name = _read_latest(root / "latest")
    if name is not None and (root / name / "state.json").is_file():
        return root / name
    # no pointer, or it names a checkpoint that is gone (pruned, deleted): the newest complete one
    done = sorted((p for p in root.glob("step-*") if NAME.fullmatch(p.name) and (p / "state.json").is_file()),
                  key=lambda p: int(p.name[5:]))
    return done[-1] if done else None


def _read_latest(pointer: Path) -> str | None:
    """The checkpoint name in ``pointer``, or None without one; DataError when it holds anything
    but a checkpoint name of this run (a path elsewhere, binary garbage): resuming or evaluating
    from a guess would be worse than stopping."""
    if not pointer.is_file():
        return None
    try:
        name = pointer.read_bytes().decode("utf-8").strip()
    except UnicodeDecodeError:
        name = None
    if name is None or not NAME.fullmatch(name):
        raise DataError(f"{pointer} does not name a checkpoint of this run (expected a name like step-00000120); "
                        f"fix or delete it to use the newest complete checkpoint")
    return name


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


def remap_optimizer_state(saved: dict[str, Any], saved_names: list[list[str]], names: list[list[str]],
                          checkpoint: Path) -> dict[str, Any]:
    """A saved optimizer state re-indexed, by parameter name, for an optimizer over ``names``.

    ``saved_names`` names the saved state's parameters group by group. A parameter trained then
    but frozen now (the temperature of a run resumed under max-margin, say) is dropped; one
    trained now but not then starts with fresh moments. Group settings (learning rates) are kept.
    """
    groups = saved["param_groups"]
    if len(groups) != len(names) or [len(g["params"]) for g in groups] != [len(n) for n in saved_names]:
        raise UserError(f"{checkpoint}: the optimizer state does not fit the model's parameters")
    index = {name: i for group, group_names in zip(groups, saved_names)
             for i, name in zip(group["params"], group_names)}
    state: dict[int, Any] = {}
    new_groups, k = [], 0
    for group, group_names in zip(groups, names):
        for name in group_names:
            if index.get(name) in saved["state"]:
                state[k] = saved["state"][index[name]]
            k += 1
        new_groups.append({**group, "params": list(range(k - len(group_names), k))})
    return {"state": state, "param_groups": new_groups}
def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__
