"""The support-set bottleneck: each caption is reconstructed from other samples' videos."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ssbctl.config import SupportSetConfig


def support_mask(kind: str, video_ids: torch.Tensor) -> torch.Tensor:
    """``(B, B)`` bool: which support items ``j`` sample ``i`` may attend to.

    ``identity``: only itself (plain captioning); ``full``: everything; ``cross``: every item that
    shows a different video, so the caption must be rebuilt from other videos.
    """
    n = video_ids.shape[0]
    if kind == "identity":
        return torch.eye(n, dtype=torch.bool, device=video_ids.device)
    if kind == "full":
        return torch.ones(n, n, dtype=torch.bool, device=video_ids.device)
    if kind == "cross":
        return video_ids[:, None] != video_ids[None, :]
    raise ValueError(f"no support mask for {kind!r}")


class SupportSetBottleneck(nn.Module):
    """``a_ij = softmax_j(<q_i, k_j> / tau)`` over allowed ``j``; ``b_i = sum_j a_ij val(v_j)``.

    Queries come from the sample's own video embedding, keys and values from the support videos.
    ``val`` yields ``slots`` memory vectors per video for the caption decoder to attend to.
    """

    def __init__(self, cfg: SupportSetConfig, embed_dim: int, memory_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.query = nn.Linear(embed_dim, embed_dim)
        self.key = nn.Linear(embed_dim, embed_dim)
        self.value = nn.Linear(embed_dim, cfg.slots * memory_dim)
        self.memory_dim = memory_dim

    def attention(self, video: torch.Tensor, video_ids: torch.Tensor) -> torch.Tensor:
        """Attention weights ``(B, B)``; a row with no allowed item is all zeros."""
        q = F.normalize(self.query(video), dim=-1)  # (B, D)
        k = F.normalize(self.key(video), dim=-1)  # (B, D)
        logits = (q @ k.t()).float() / self.cfg.temperature  # (B, B)
        allowed = support_mask(self.cfg.mask, video_ids)
        logits = logits.masked_fill(~allowed, float("-inf"))
        weights = torch.softmax(logits, dim=-1)
        return torch.where(allowed.any(dim=-1, keepdim=True), weights, torch.zeros_like(weights))

    def forward(self, video: torch.Tensor, video_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Bottleneck memory ``(B, slots, memory_dim)`` and the attention weights ``(B, B)``."""
        weights = self.attention(video, video_ids)
        values = self.value(video).view(video.shape[0], -1)  # (B, slots * M)
        memory = (weights.to(values.dtype) @ values).view(-1, self.cfg.slots, self.memory_dim)
        return memory, weights
