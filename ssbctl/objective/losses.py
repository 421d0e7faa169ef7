"""Contrastive (InfoNCE, max-margin) and captioning losses of the SSB objective.

Every contrastive loss takes the video id of each pair, so that two captions of the same video
in one batch are positives for each other's video instead of false negatives.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ssbctl.config import LossConfig
from ssbctl.core.distributed import world
from ssbctl.model.decoder import IGNORE_INDEX
from ssbctl.model.precision import fp32_or_wider

__all__ = ["IGNORE_INDEX", "SSBLoss", "caption_loss", "fp32_or_wider", "infonce_loss", "max_margin_loss",
           "same_video"]


def same_video(video_ids: torch.Tensor) -> torch.Tensor:
    """``(B, B)`` bool: pairs ``(i, j)`` that show the same video."""
    return video_ids[:, None] == video_ids[None, :]


def infonce_loss(text: torch.Tensor, video: torch.Tensor, video_ids: torch.Tensor,
                 logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of normalised ``text`` and ``video`` embeddings ``(B, D)``.

    Each row's loss is ``-log`` of the softmax mass on all its positives (pairs of the same video).
    """
    logits = logit_scale * text @ video.t()  # (B, B): caption i vs video j
    positive = same_video(video_ids)
    neg_inf = torch.finfo(logits.dtype).min

    def one_way(sim: torch.Tensor) -> torch.Tensor:
        pos = torch.logsumexp(sim.masked_fill(~positive, neg_inf), dim=1)
        return (torch.logsumexp(sim, dim=1) - pos).mean()

    return 0.5 * (one_way(logits) + one_way(logits.t()))


def max_margin_loss(text: torch.Tensor, video: torch.Tensor, video_ids: torch.Tensor,
                    margin: float, reduction: str = "mean") -> torch.Tensor:
    """Bidirectional max-margin ranking loss (the paper's choice).

    Each positive pair ``(i, i)`` and each ``j`` that shows another video give two hinges,
    ``[m + s_ij - s_ii]_+`` (caption ``i`` against video ``j``) and ``[m + s_ji - s_ii]_+``.
    ``mean`` averages them over all those negatives (``2B(B-1)`` with distinct videos; MMT's
    ``fix_norm``), so the term's scale does not depend on the batch size; ``sum`` adds them and
    divides by the batch (ssbctl's former reduction), which grows like ``2(B-1)`` times the mean.
    """
    sims = text @ video.t()  # (B, B)
    pos = sims.diagonal()
    negative = ~same_video(video_ids)
    t2v = (margin + sims - pos[:, None]).clamp(min=0) * negative
    v2t = (margin + sims - pos[None, :]).clamp(min=0) * negative
    total = t2v.sum() + v2t.sum()
    if reduction == "sum":
        return total / sims.shape[0]
    if reduction == "mean":
        return total / (2 * negative.sum()).clamp(min=1)
    raise ValueError(f"no max-margin reduction {reduction!r}")


def caption_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Teacher-forced token cross-entropy, ``logits (B, L, V)``, ``targets (B, L)`` with -100 as padding.

    Averaged over the tokens of the *global* batch. Distributed, the value is the global mean on
    every rank while the gradient is that of this rank's share times the world size, which DDP's
    gradient averaging turns back into the global mean's gradient.
    """
    total = F.cross_entropy(fp32_or_wider(logits.flatten(0, 1)), targets.flatten(), ignore_index=IGNORE_INDEX,
                            reduction="sum")
    _, size = world()
    if size == 1:
        return total / (targets != IGNORE_INDEX).sum().clamp(min=1)
    count = (targets != IGNORE_INDEX).sum().float().reshape(1)
    dist.all_reduce(count)
    local = total / count.clamp(min=1)[0]
    value = local.detach().clone()
    dist.all_reduce(value)
    return size * local + (value - size * local).detach()


class SSBLoss(nn.Module):
    """``L = L_contrastive + lambda * L_caption``, returned as named terms."""

    def __init__(self, cfg: LossConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.max_log_scale = math.log(cfg.max_logit_scale)

    def forward(self, text: torch.Tensor, video: torch.Tensor, video_ids: torch.Tensor,
                log_scale: torch.Tensor, caption_logits: torch.Tensor | None = None,
                caption_targets: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Loss terms; ``loss`` is the one to minimise."""
        # Similarities in fp32 even under AMP: at a logit scale near 100, bf16 logits are only
        # 0.5 apart, coarser than the differences the loss ranks by. (B, B) is cheap either way.
        with torch.autocast(text.device.type, enabled=False):
            if self.cfg.contrastive == "infonce":
                scale = fp32_or_wider(log_scale).clamp(max=self.max_log_scale).exp()
                contrastive = infonce_loss(fp32_or_wider(text), fp32_or_wider(video), video_ids, scale)
            else:
                contrastive = max_margin_loss(fp32_or_wider(text), fp32_or_wider(video), video_ids, self.cfg.margin,
                                              self.cfg.margin_reduction)
        out = {"contrastive_loss": contrastive}
        total = contrastive
        if caption_logits is not None and caption_targets is not None:
            out["caption_loss"] = caption_loss(caption_logits, caption_targets)
            total = total + self.cfg.caption_weight * out["caption_loss"]
        out["loss"] = total
        return out
