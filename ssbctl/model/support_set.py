"""The support-set bottleneck: each caption is reconstructed from other samples' videos."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ssbctl.config import SupportSetConfig
from ssbctl.model.precision import fp32_or_wider


def support_mask(kind: str, query_ids: torch.Tensor, support_ids: torch.Tensor | None = None,
                 query_pos: torch.Tensor | None = None) -> torch.Tensor:
    """``(Q, S)`` bool: which support items ``j`` query ``i`` may attend to.

    ``identity``: only itself (plain captioning); ``full``: everything; ``cross``: every item that
    shows a different video, so the caption must be rebuilt from other videos. ``query_pos`` is
    each query's position in the support set (its global index when the support set is gathered
    from all ranks); by default queries are the support set itself.
    """
    support_ids = query_ids if support_ids is None else support_ids
    if query_pos is None:
        query_pos = torch.arange(query_ids.shape[0], device=query_ids.device)
    if kind == "identity":
        return query_pos[:, None] == torch.arange(support_ids.shape[0], device=query_ids.device)[None, :]
    if kind == "full":
        return torch.ones(query_ids.shape[0], support_ids.shape[0], dtype=torch.bool, device=query_ids.device)
    if kind == "cross":
        return query_ids[:, None] != support_ids[None, :]
    raise ValueError(f"no support mask for {kind!r}")


class SupportSetBottleneck(nn.Module):
    """``a_ij = softmax_j(<q_i, k_j> / tau)`` over allowed ``j``; ``b_i = sum_j a_ij val(v_j)``.

    Queries come from the sample's own video embedding, keys and values from the support videos
    (the whole global batch when training on several GPUs). ``val`` yields ``slots`` memory
    vectors per video for the caption decoder to attend to.
    """

    def __init__(self, cfg: SupportSetConfig, embed_dim: int, memory_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.query = nn.Linear(embed_dim, embed_dim)
        self.key = nn.Linear(embed_dim, embed_dim)
        self.value = nn.Linear(embed_dim, cfg.slots * memory_dim)
        self.memory_dim = memory_dim
        if cfg.mask == "identity":
            # Each query attends to itself alone, so the weights are 1 whatever q and k are: their
            # gradient is exactly zero. Frozen, they are not trained (nor weight-decayed) for nothing.
            self.query.requires_grad_(False)
            self.key.requires_grad_(False)

    def attention(self, video: torch.Tensor, video_ids: torch.Tensor, support: torch.Tensor | None = None,
                  support_ids: torch.Tensor | None = None, offset: int = 0) -> torch.Tensor:
        """Attention weights ``(Q, S)``; a row with no allowed item is all zeros."""
        support = video if support is None else support
        pos = torch.arange(video.shape[0], device=video.device) + offset
        return self.masked_attention(video, support, support_mask(self.cfg.mask, video_ids, support_ids, pos))

    def masked_attention(self, video: torch.Tensor, support: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """Attention weights ``(Q, S)`` of ``video`` over the ``support`` items that ``allowed``
        ``(Q, S)`` marks (the mask's rule applied by the caller, as captioning does for videos
        that may or may not be in the support set); a row with no allowed item is all zeros."""
        q = F.normalize(self.query(video), dim=-1)  # (Q, D)
        k = F.normalize(self.key(support), dim=-1)  # (S, D)
        logits = fp32_or_wider(q @ k.t()) / self.cfg.temperature  # (Q, S)
        weights = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
        return torch.where(allowed.any(dim=-1, keepdim=True), weights, torch.zeros_like(weights))

    def read(self, weights: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
        """The bottleneck memory ``(Q, slots, memory_dim)``: ``weights (Q, S)`` over ``val(support)``."""
        values = self.value(support).view(support.shape[0], -1)  # (S, slots * M)
        return (weights.to(values.dtype) @ values).view(-1, self.cfg.slots, self.memory_dim)

    def forward(self, video: torch.Tensor, video_ids: torch.Tensor, support: torch.Tensor | None = None,
                support_ids: torch.Tensor | None = None, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Bottleneck memory ``(Q, slots, memory_dim)`` and the attention weights ``(Q, S)``.

        ``support``/``support_ids`` default to the queries themselves; ``offset`` is the queries'
        position in the support set (``rank * local_batch`` for a gathered global batch).
        """
        support = video if support is None else support
        weights = self.attention(video, video_ids, support, support_ids, offset)
        return self.read(weights, support), weights
