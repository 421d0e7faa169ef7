"""Capturing and restoring the random-number state training draws on (dropout, shuffling): for a
checkpoint (so a resumed run continues the same sequence) and around each micro-batch of gradient
accumulation (so its re-run draws the same dropout masks)."""

from __future__ import annotations

from typing import Any

import torch


def rng_states(device: torch.device | None = None) -> dict[str, Any]:
    """The CPU generator's state and the CUDA ones': every GPU's, or only ``device``'s when given
    (a micro-batch runs on one device; a checkpoint keeps them all)."""
    states: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device is None:
        if torch.cuda.is_available():
            states["cuda"] = torch.cuda.get_rng_state_all()
    elif device.type == "cuda":
        states["cuda_device"] = (device, torch.cuda.get_rng_state(device))
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what :func:`rng_states` captured."""
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    if "cuda_device" in states:
        device, state = states["cuda_device"]
        torch.cuda.set_rng_state(state, device)
