"""The one place that turns a device name (``auto``, ``cpu``, ``cuda``, ``cuda:N``) into a device."""

from __future__ import annotations

import torch

from ssbctl.core.errors import UserError

DEVICES = ("auto", "cpu", "cuda")


def check_device_name(name: str, what: str = "--device") -> str:
    """``name`` if it is auto, cpu, cuda or cuda:N; else a UserError naming ``what``."""
    base, _, index = name.partition(":")
    if name in DEVICES or (base == "cuda" and index.isdigit()):
        return name
    raise UserError(f"{what} must be auto, cpu, cuda or cuda:N, got {name!r}")


def resolve_device(name: str = "auto", local_rank: int | None = None) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without it, or another device, is a user error.

    With ``local_rank`` (a torchrun worker), plain ``cuda`` means this worker's own GPU."""
    check_device_name(name)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("device 'cuda' requested but CUDA is not available")
    if name == "cuda" and local_rank is not None:
        return torch.device(f"cuda:{local_rank}")
    return torch.device(name)
