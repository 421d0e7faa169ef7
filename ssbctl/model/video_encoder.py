"""MMT-style temporal transformer over per-frame features of one or more experts."""

from __future__ import annotations

import torch
import torch.nn as nn

from ssbctl.config import VideoEncoderConfig
from ssbctl.core.errors import UserError


class VideoEncoder(nn.Module):
    """Projects each expert's frame features to a common width, adds position and expert-type
    embeddings, runs a transformer over all tokens and mean-pools the valid ones to ``(B, D)``."""

    def __init__(self, cfg: VideoEncoderConfig, embed_dim: int) -> None:
        super().__init__()
        if not cfg.input_dims:
            raise UserError("model.video.input_dims is empty: it must be set from the prepared data")
        self.cfg = cfg
        width = cfg.hidden_dim
        self.inputs = nn.ModuleList(nn.Linear(d, width) for d in cfg.input_dims)
        self.position = nn.Parameter(torch.randn(cfg.max_frames, width) * 0.02)
        self.expert_type = nn.Parameter(torch.randn(len(cfg.input_dims), width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, cfg.heads, 4 * width, cfg.dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, embed_dim)

    def forward(self, features: list[torch.Tensor], masks: list[torch.Tensor]) -> torch.Tensor:
        """``features[e]``: ``(B, T_e, dim_e)``; ``masks[e]``: ``(B, T_e)`` True on real frames."""
        tokens = []
        for e, (x, inp) in enumerate(zip(features, self.inputs)):
            if x.shape[1] > self.cfg.max_frames:
                raise UserError(f"{x.shape[1]} frames exceed model.video.max_frames={self.cfg.max_frames}")
            tokens.append(inp(x) + self.position[: x.shape[1]] + self.expert_type[e])  # (B, T_e, W)
        x = torch.cat(tokens, dim=1)  # (B, T, W)
        valid = torch.cat(masks, dim=1)  # (B, T)
        x = self.norm(self.transformer(x, src_key_padding_mask=~valid))
        weights = valid.unsqueeze(-1).to(x.dtype)
        pooled = (x * weights).sum(1) / weights.sum(1).clamp(min=1.0)  # (B, W)
        return self.proj(pooled)  # (B, D)
