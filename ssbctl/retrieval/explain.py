"""Why a video was found: the support-set attention of the run's bottleneck, and dual-softmax
re-ranking over a bank of other queries."""

from __future__ import annotations

from typing import Any

import torch

from ssbctl.core.errors import UserError
from ssbctl.inference.run import LoadedRun
from ssbctl.retrieval.index import Index


@torch.no_grad()
def support_attention(run: LoadedRun, index: Index, query: torch.Tensor, k: int = 8) -> dict[str, Any]:
    """The bottleneck's attention among a query's top-``k`` videos (its support set).

    Row ``i`` is how caption reconstruction for video ``i`` draws on the others, exactly as in
    training (the run's own mask; ``cross`` keeps a video from drawing on itself). Row 0 is the
    top result: ``draws_on`` lists the support videos it uses, heaviest first.
    """
    if not index.videos:
        raise UserError("the index is empty: there is no result to explain")
    scores, found = index.top(query[:1], k)
    return attention_among(run, index, found[0].tolist(), scores[0].tolist())


@torch.no_grad()
def attention_among(run: LoadedRun, index: Index, rows: list[int], scores: list[float]) -> dict[str, Any]:
    """The bottleneck's attention among the index ``rows`` given in retrieval order (``scores``:
    theirs): weights ``(n, n)``, and ``draws_on``, the videos row 0 draws on, heaviest first, each
    with its retrieval ``rank`` (its position in ``rows``, from 1)."""
    support = run.model.support
    if support is None:
        raise UserError("this run has no support set (trained with model.support.mask = none)")
    if not rows:
        raise UserError("the index found no video for this query")
    videos = index.embeddings[torch.tensor(rows)].float().to(run.device)  # (n, D)
    ids = torch.arange(len(rows), device=run.device)  # distinct videos
    weights = support.attention(videos, ids).cpu()  # (n, n)
    names = [index.videos[r]["video_id"] for r in rows]
    order = torch.argsort(weights[0], descending=True).tolist()
    return {"videos": names, "scores": list(scores), "weights": weights.tolist(), "mask": support.cfg.mask,
            "draws_on": [{"rank": j + 1, "video_id": names[j], "weight": float(weights[0, j])}
                         for j in order if weights[0, j] > 0]}


def dual_softmax(index: Index, queries: torch.Tensor, bank: torch.Tensor, k: int, candidates: int = 100,
                 temperature: float = 100.0) -> list[list[dict[str, Any]]]:
    """Re-rank each query's top ``candidates`` by dual softmax over the queries plus a bank of
    other queries: a video many other queries also match is pushed down. Plain scores are kept
    beside the re-ranked ones (``score`` and ``ds_score``)."""
    _, rows = index.top(queries, candidates)  # per query; an approximate index may find fewer
    pool = torch.unique(torch.cat(rows))  # candidate videos of all queries
    gallery = index.embeddings[pool].float()  # (C, D)
    sims = torch.cat([queries.float(), bank.float()]) @ gallery.t()  # (Q + M, C)
    prior = torch.softmax(sims * temperature, dim=0)[: queries.shape[0]]  # each video's share per query
    rescored = sims[: queries.shape[0]] * prior
    out = []
    for q in range(queries.shape[0]):
        mine = torch.isin(pool, rows[q])
        cols = torch.nonzero(mine).flatten()
        best = cols[torch.argsort(rescored[q, cols], descending=True)[:k]]
        out.append([{"rank": r + 1, "video_id": index.videos[int(pool[c])]["video_id"],
                     "score": float(sims[q, c]), "ds_score": float(rescored[q, c]),
                     "path": index.videos[int(pool[c])]["path"]} for r, c in enumerate(best.tolist())])
    return out
