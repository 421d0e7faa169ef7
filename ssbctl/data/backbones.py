"""Frozen frame backbones ("experts") that turn decoded frames into per-frame features.

Each backbone is registered by name. The built-in ``pixels`` backbone needs no weights (frames
resized small and flattened) and is what the offline demo uses; learned backbones (CLIP, DINOv2
through ``transformers``) register here the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ssbctl.core.errors import UserError
from ssbctl.data.backbone import Backbone, FeatureSource
from ssbctl.data.hf_backbones import clip_backbone, hf_backbone


class PixelsBackbone(Backbone):
    """Frames area-resized to ``size x size``, scaled to [-1, 1] and flattened. No learned weights."""

    name = "pixels"

    def __init__(self, size: int = 32) -> None:
        if size < 1:
            raise UserError(f"pixels backbone: size must be >= 1, got {size}")
        self.size = size
        self.dim = 3 * size * size

    def options(self) -> dict[str, Any]:
        return {"size": self.size}

    def decode_side(self) -> int:
        """Four times the feature side: the area resize then averages 4x4 blocks or more, which
        keeps the features within about a grey level of full frames (benchmarks/decode_at_size.py)."""
        return 4 * self.size

    @torch.no_grad()
    def encode(self, frames: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()  # (T, 3, H, W)
        x = F.interpolate(x, size=(self.size, self.size), mode="area")
        return (x / 127.5 - 1.0).flatten(1)  # (T, 3*size*size)


BACKBONES: dict[str, Callable[..., Backbone]] = {"pixels": PixelsBackbone, "clip": clip_backbone, "hf": hf_backbone}


def build_backbone(name: str, **options: Any) -> Backbone:
    """A registered backbone by name."""
    if name not in BACKBONES:
        raise UserError(f"unknown backbone '{name}'; known: {', '.join(sorted(BACKBONES))}")
    return BACKBONES[name](**options)


def parse_backbone(spec: str, pixel_size: int | None = None, device: str = "auto") -> Backbone:
    """``pixels``, ``clip``, ``clip:MODEL`` or ``hf:MODEL`` (MODEL a hub id or a local folder);
    ``pixel_size`` None: the ``pixels`` backbone's default side."""
    name, _, model = spec.partition(":")
    if name == "pixels":
        return build_backbone("pixels") if pixel_size is None else build_backbone("pixels", size=pixel_size)
    if name == "hf" and not model:
        raise UserError("--backbone hf needs a model: hf:facebook/dinov2-small or hf:/path/to/model")
    return build_backbone(name, **({"model": model} if model else {}), device=device)


def backbone_tag(backbone: FeatureSource) -> str:
    """A short name for folder names: ``pixels``, or the model's last path component."""
    model = backbone.options().get("model")
    return backbone.name if not model else str(model).rstrip("/").rsplit("/", 1)[-1]


class ImportedFeatures(FeatureSource):
    """Features extracted elsewhere (one ``.npy`` or ``.safetensors`` per video), imported as they
    are: a source with no ``encode`` (nothing to compute), so it cannot embed a new video."""

    name = "imported"

    def __init__(self, dim: int, source: str = "") -> None:
        self.dim, self.source = dim, source

    def options(self) -> dict[str, Any]:
        return {"source": self.source}
