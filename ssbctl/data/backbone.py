"""The frame-backbone interface that every expert implements (pixels, CLIP, any image model)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import torch


class Backbone(ABC):
    """Maps uint8 frames ``(T, H, W, 3)`` to float32 features ``(T, dim)``."""

    name: str
    dim: int

    @abstractmethod
    def options(self) -> dict[str, Any]:
        """Everything needed to rebuild this backbone (written to the manifest)."""

    @abstractmethod
    def encode(self, frames: np.ndarray) -> torch.Tensor:
        """Features of each frame, ``(T, dim)`` float32 on the CPU."""
