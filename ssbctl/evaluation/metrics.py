"""Recall@K, median and mean rank for text-to-video and video-to-text retrieval.

Conventions (stated once, used everywhere):
- Every caption is a text-to-video query; its one correct video is the video it describes.
- Video-to-text with several captions per video counts the *best-ranked* correct caption
  (the "min rank over the group" convention); the video's other captions are not competitors.
- Ties go against the model: the rank of the correct item is 1 + the number of *wrong* items
  scoring greater than **or equal to** it. A tie is counted once, never twice, and a model that
  gives every item the same score gets the worst rank, not the best.
- A non-finite similarity (from a NaN or Inf embedding) counts as ``-inf``: it ranks last, and
  a correct item whose score is not finite ties with (so ranks below) every such wrong item.
Similarities are computed in chunks of queries, so memory stays bounded by chunk x gallery.
"""

from __future__ import annotations

import numpy as np
import torch


def _finite_or_last(sims: torch.Tensor) -> torch.Tensor:
    """``sims`` with every NaN and +-Inf replaced by ``-inf`` (NaN compares false both ways, so a
    NaN target would otherwise beat every competitor)."""
    return sims.masked_fill(~torch.isfinite(sims), float("-inf"))


def t2v_ranks(text: torch.Tensor, video: torch.Tensor, caption_video: torch.Tensor,
              chunk: int = 1024) -> torch.Tensor:
    """1-based rank of the correct video for each caption: ``text (Nc, D)``, ``video (Nv, D)``."""
    ranks = []
    for start in range(0, text.shape[0], chunk):
        sims = _finite_or_last(text[start:start + chunk] @ video.t())  # (c, Nv)
        own = caption_video[start:start + chunk, None]  # (c, 1)
        target = sims.gather(1, own)  # (c, 1)
        wrong = torch.ones_like(sims, dtype=torch.bool).scatter_(1, own, False)
        ranks.append(((sims >= target) & wrong).sum(1) + 1)
    return torch.cat(ranks)


def v2t_ranks(text: torch.Tensor, video: torch.Tensor, caption_video: torch.Tensor,
              chunk: int = 1024) -> torch.Tensor:
    """1-based rank of each captioned video's best correct caption among all captions."""
    captioned = torch.unique(caption_video)
    ranks = []
    for start in range(0, len(captioned), chunk):
        ids = captioned[start:start + chunk]  # (c,)
        sims = _finite_or_last(video[ids] @ text.t())  # (c, Nc)
        own = caption_video[None, :] == ids[:, None]  # (c, Nc)
        best = sims.masked_fill(~own, float("-inf")).max(dim=1, keepdim=True).values  # (c, 1)
        ranks.append(((sims >= best) & ~own).sum(1) + 1)
    return torch.cat(ranks)


def rank_summary(ranks: torch.Tensor, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """R@K in percent, median rank (MdR) and mean rank (MnR)."""
    r = ranks.double().cpu().numpy()
    out = {f"R{k}": float(100.0 * np.mean(r <= k)) for k in ks}
    out["MdR"] = float(np.median(r))
    out["MnR"] = float(np.mean(r))
    return out


def retrieval_metrics(text: torch.Tensor, video: torch.Tensor, caption_video: torch.Tensor,
                      ks: tuple[int, ...] = (1, 5, 10), chunk: int = 1024) -> dict[str, object]:
    """Both directions on normalised embeddings; ``caption_video[i]`` is caption i's video row."""
    text, video = text.float(), video.float()
    caption_video = caption_video.long()
    return {
        "t2v": rank_summary(t2v_ranks(text, video, caption_video, chunk), ks),
        "v2t": rank_summary(v2t_ranks(text, video, caption_video, chunk), ks),
        "n_queries": int(text.shape[0]),
        "n_videos": int(video.shape[0]),
    }
