"""Where an expert's per-frame features come from: a backbone that computes them from frames
(pixels, CLIP, any image model), or features imported as they are from files made elsewhere."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import torch


class FeatureSource(ABC):
    """An expert's features: ``dim`` floats per frame, described by ``name`` and ``options()``
    (written to the manifest, so a run knows what its features were)."""

    name: str
    dim: int

    @abstractmethod
    def options(self) -> dict[str, Any]:
        """Everything needed to rebuild this source (written to the manifest)."""

    def decode_side(self) -> int | None:
        """The shorter side, in pixels, frames may be decoded at for this source without changing
        its features beyond about a grey level (``Sampling.short_side``); None: full frames."""
        return None


class Backbone(FeatureSource):
    """Maps uint8 frames ``(T, H, W, 3)`` to float32 features ``(T, dim)``."""

    @abstractmethod
    def encode(self, frames: np.ndarray) -> torch.Tensor:
        """Features of each frame, ``(T, dim)`` float32 on the CPU."""
