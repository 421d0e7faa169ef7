"""Numeric precision shared by the model and the objective."""

from __future__ import annotations

import torch


def fp32_or_wider(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32, or unchanged when wider: AMP's half-precision outputs are promoted for the
    similarities and losses, while a float64 model (for numerical checks) stays in float64."""
    return x if x.dtype == torch.float64 else x.float()
