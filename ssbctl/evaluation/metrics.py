"""Recall@K, median and mean rank for text-to-video and video-to-text retrieval.

Conventions (stated once, used everywhere):
- Every caption is a text-to-video query; its one correct video is the video it describes.
- Video-to-text with several captions per video (MSVD, VATEX) has two conventions in the field,
  both computed here and named in the output (``v2t_convention``):

  ``clip4clip`` (CLIP4Clip and the CLIP-based tables after it): each captioned video is a query
  over the *videos'* caption groups, a group scoring the max over its captions; the rank is the
  own group's among all groups. :func:`v2t_group_max_ranks`.

  ``mmt`` (MMT, CE, the support-set paper's era): each captioned video is a query over all
  *captions*; the rank is that of its best-ranked own caption, its other captions not counted as
  competitors. :func:`v2t_ranks`.

  They agree at R@1 and when every video has one caption; beyond R@1 an ``mmt`` rank is never
  better than the ``clip4clip`` one, since another video's several captions each count as a
  competitor there but as one group here.
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

V2T_CONVENTIONS = ("clip4clip", "mmt")  # see the module docstring
# The default: the README compares the CLIP recipes with zero-shot CLIP and CLIP4Clip, whose
# multi-caption video-to-text numbers (MSVD, VATEX, ...) use CLIP4Clip's convention.
DEFAULT_V2T_CONVENTION = "clip4clip"
V2T_DESCRIPTIONS = {  # for tables and help texts
    "clip4clip": "videos ranked by the max over their captions (CLIP4Clip and the CLIP tables after it)",
    "mmt": "each video's best caption ranked among all captions (MMT, CE)",
}


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
    """The ``mmt`` convention: 1-based rank of each captioned video's best correct caption among
    all captions (in ascending video-row order)."""
    captioned = torch.unique(caption_video)
    ranks = []
    for start in range(0, len(captioned), chunk):
        ids = captioned[start:start + chunk]  # (c,)
        sims = _finite_or_last(video[ids] @ text.t())  # (c, Nc)
        own = caption_video[None, :] == ids[:, None]  # (c, Nc)
        best = sims.masked_fill(~own, float("-inf")).max(dim=1, keepdim=True).values  # (c, 1)
        ranks.append(((sims >= best) & ~own).sum(1) + 1)
    return torch.cat(ranks)


def v2t_group_max_ranks(text: torch.Tensor, video: torch.Tensor, caption_video: torch.Tensor,
                        chunk: int = 1024) -> torch.Tensor:
    """The ``clip4clip`` convention: 1-based rank of each captioned video's own caption group among
    the caption groups of all captioned videos, a group scoring the max of its captions'
    similarities to the query video (in ascending video-row order, as :func:`v2t_ranks`).

    CLIP4Clip computes this by padding each video's captions to a (groups, max captions, videos)
    tensor with ``-inf`` and taking the max over the caption axis; here the max is a scatter
    reduction of the (videos x captions) similarities into (videos x groups), without padding.
    A video without captions forms no group (it is neither a query nor a candidate)."""
    captioned = torch.unique(caption_video)  # sorted: group g is video row captioned[g]
    group_of = torch.searchsorted(captioned, caption_video).to(text.device)  # (Nc,) group of each caption
    ranks = []
    for start in range(0, len(captioned), chunk):
        ids = captioned[start:start + chunk]  # (c,)
        sims = _finite_or_last(video[ids] @ text.t())  # (c, Nc)
        groups = sims.new_full((len(ids), len(captioned)), float("-inf"))
        # (c, G): the max over each group's captions (the expanded index is a view, not a copy)
        groups.scatter_reduce_(1, group_of.expand_as(sims), sims, reduce="amax")
        own = torch.arange(start, start + len(ids), device=groups.device)[:, None]  # (c, 1)
        target = groups.gather(1, own)  # (c, 1)
        wrong = torch.ones_like(groups, dtype=torch.bool).scatter_(1, own, False)
        ranks.append(((groups >= target) & wrong).sum(1) + 1)
    return torch.cat(ranks)


def v2t_ranks_by(convention: str, text: torch.Tensor, video: torch.Tensor, caption_video: torch.Tensor,
                 chunk: int = 1024) -> torch.Tensor:
    """Video-to-text ranks under ``convention`` (one of :data:`V2T_CONVENTIONS`)."""
    if convention == "clip4clip":
        return v2t_group_max_ranks(text, video, caption_video, chunk)
    if convention == "mmt":
        return v2t_ranks(text, video, caption_video, chunk)
    raise ValueError(f"unknown video-to-text convention {convention!r}; known: {', '.join(V2T_CONVENTIONS)}")


def rank_summary(ranks: torch.Tensor, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """R@K in percent, median rank (MdR) and mean rank (MnR)."""
    r = ranks.double().cpu().numpy()
    out = {f"R{k}": float(100.0 * np.mean(r <= k)) for k in ks}
    out["MdR"] = float(np.median(r))
    out["MnR"] = float(np.mean(r))
    return out


def retrieval_metrics(text: torch.Tensor, video: torch.Tensor, caption_video: torch.Tensor,
                      ks: tuple[int, ...] = (1, 5, 10), chunk: int = 1024,
                      v2t_convention: str = DEFAULT_V2T_CONVENTION) -> dict[str, object]:
    """Both directions on normalised embeddings; ``caption_video[i]`` is caption i's video row.

    ``v2t`` is video-to-text under ``v2t_convention``, and the result names it under that key. When
    some video has several captions the conventions differ, and both blocks are added as
    ``v2t_clip4clip`` and ``v2t_mmt`` (with one caption per video they are equal: ``v2t`` only)."""
    if v2t_convention not in V2T_CONVENTIONS:
        raise ValueError(f"unknown video-to-text convention {v2t_convention!r}; known: {', '.join(V2T_CONVENTIONS)}")
    text, video = text.float(), video.float()
    caption_video = caption_video.long()
    multi = bool(len(caption_video)) and int(torch.bincount(caption_video).max()) > 1
    v2t = {name: rank_summary(v2t_ranks_by(name, text, video, caption_video, chunk), ks)
           for name in (V2T_CONVENTIONS if multi else (v2t_convention,))}
    return {
        "t2v": rank_summary(t2v_ranks(text, video, caption_video, chunk), ks),
        "v2t": v2t[v2t_convention],
        "v2t_convention": v2t_convention,
        **({f"v2t_{name}": block for name, block in v2t.items()} if multi else {}),
        "n_queries": int(text.shape[0]),
        "n_videos": int(video.shape[0]),
    }
