"""Frame backbones through `transformers`: CLIP vision towers and any image model AutoModel loads.

CLIP (and SigLIP) give their projected / pooled image embedding; other models (DINOv2, ViT, ...)
their pooler output, else the first token. Frames go through the model's own image processor.
On CUDA the model runs under bf16 autocast; features are returned as float32 on the CPU.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ssbctl.core.device import resolve_device
from ssbctl.core.hf import load_pretrained
from ssbctl.data.backbone import Backbone

DEFAULT_CLIP = "openai/clip-vit-base-patch32"


class HFImageBackbone(Backbone):
    """An image model loaded with ``from_pretrained`` (hub id or local folder), run frame by frame."""

    def __init__(self, model: str = DEFAULT_CLIP, kind: str = "hf", device: str = "auto",
                 batch_size: int = 64) -> None:
        import transformers

        self.name, self.model_id, self.batch_size = kind, model, batch_size

        def load(local: bool) -> tuple[Any, Any]:
            config = transformers.AutoConfig.from_pretrained(model, local_files_only=local)
            return (self._model_class(config).from_pretrained(model, config=self._tower_config(config),
                                                              local_files_only=local).eval(),
                    transformers.AutoImageProcessor.from_pretrained(model, local_files_only=local))

        self.model, self.processor = load_pretrained("image model", model, model, load)
        self.model.requires_grad_(False)
        self.device = resolve_device(device)
        self.model.to(self.device)
        self.dim = int(self.encode(np.zeros((1, 32, 32, 3), np.uint8)).shape[1])

    @staticmethod
    def _model_class(config: Any) -> Any:
        import transformers

        kind = getattr(config, "model_type", "")
        if kind in ("clip", "clip_vision_model"):
            return transformers.CLIPVisionModelWithProjection
        if kind in ("siglip", "siglip_vision_model"):
            return transformers.SiglipVisionModel
        return transformers.AutoModel

    @staticmethod
    def _tower_config(config: Any) -> Any:
        """The image tower's config of a whole dual-encoder checkpoint. CLIP's keeps the model's
        projection size: the vision config's own default (512) would re-initialise any other
        model's ``visual_projection`` at random (ViT-L/14's 768, a small model's)."""
        kind = getattr(config, "model_type", "")
        if kind == "clip":
            vision = config.vision_config
            vision.projection_dim = config.projection_dim
            return vision
        return config.vision_config if kind == "siglip" else config

    def options(self) -> dict[str, Any]:
        return {"model": self.model_id}

    def decode_side(self) -> int | None:
        """The side the image processor resizes to (CLIP: the shorter side to 224, as CLIP4Clip
        preprocesses its videos), so its own resize is then (nearly) a no-op; None when unknown."""
        size = getattr(self.processor, "size", None)  # a dict, or transformers 5's SizeDict
        read = size.get if isinstance(size, dict) else lambda key: getattr(size, key, None)
        sides = [v for v in (read(k) for k in ("shortest_edge", "height", "width")) if v is not None]
        return max(sides) if sides and all(isinstance(v, int) and v > 0 for v in sides) else None

    @torch.no_grad()
    def encode(self, frames: np.ndarray) -> torch.Tensor:
        out = []
        for start in range(0, len(frames), self.batch_size):
            images = list(frames[start:start + self.batch_size])
            pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                result = self.model(pixel_values=pixels)
            out.append(self._pool(result).float().cpu())
        return torch.cat(out)  # (T, dim)

    @staticmethod
    def _pool(result: Any) -> torch.Tensor:
        for attr in ("image_embeds", "pooler_output"):
            value = getattr(result, attr, None)
            if value is not None:
                return value
        return result.last_hidden_state[:, 0]


def clip_backbone(model: str = DEFAULT_CLIP, **kwargs: Any) -> HFImageBackbone:
    """A CLIP vision tower (the recipes' default frame backbone)."""
    return HFImageBackbone(model, kind="clip", **kwargs)


def hf_backbone(model: str, **kwargs: Any) -> HFImageBackbone:
    """Any image model that AutoModel loads (DINOv2, ViT, SigLIP, ...)."""
    return HFImageBackbone(model, kind="hf", **kwargs)
