"""The plain exact scan: top-k inner products of queries over a gallery in bounded memory (the
index's search, and the fallback of the screened search in :mod:`ssbctl.retrieval.exact`)."""

from __future__ import annotations

import torch


def topk_search(queries: torch.Tensor, gallery: torch.Tensor, k: int, chunk: int = 4096,
                query_block: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``k`` inner products of ``queries (Q, D)`` over ``gallery (N, D)``.

    Blocks of queries meet chunks of the gallery in one reused score buffer. Each query keeps
    its running top-k and the score it takes to enter it; a chunk is sorted only for the queries
    that have a score above that bar (after the first chunks, few do), so the scan costs little
    more than the matrix products. Memory: ``query_block x chunk`` scores, whatever N is.
    Returns scores and gallery rows, best first. A non-finite score (a NaN or Inf embedding)
    ranks below every finite one and comes back as ``-inf``.

    A few queries (a served search, ``Q x N`` within the same ``query_block x chunk`` scores)
    take one product and one top-k instead: at 8 x 100k that is about twice as fast as the
    chunked loop, whose per-chunk bookkeeping then costs more than the products.
    """
    k = min(k, gallery.shape[0])
    last = torch.finfo(queries.dtype).min  # stands in for non-finite scores: below any real one
    if 0 < queries.shape[0] * gallery.shape[0] <= query_block * chunk:
        scores = torch.mm(queries, gallery.to(queries.dtype).t())  # (Q, N)
        scores.masked_fill_(~torch.isfinite(scores), last)
        top = scores.topk(k, dim=1)
        return top.values.masked_fill(top.values <= last, float("-inf")), top.indices
    buffer = queries.new_empty(min(query_block, queries.shape[0]), min(chunk, gallery.shape[0]))
    scores_out, rows_out = [], []
    for qs in range(0, queries.shape[0], query_block):
        block = queries[qs:qs + query_block]
        best = block.new_full((block.shape[0], k), float("-inf"))
        rows = torch.zeros(block.shape[0], k, dtype=torch.long)
        for start in range(0, gallery.shape[0], chunk):
            part = gallery[start:start + chunk].to(queries.dtype)
            scores = buffer[: block.shape[0], : part.shape[0]]
            torch.mm(block, part.t(), out=scores)  # (q, c)
            scores.masked_fill_(~torch.isfinite(scores), last)  # NaN would never enter the top-k
            hit = torch.nonzero(scores.amax(dim=1) > best[:, -1]).flatten()  # queries whose top-k changes
            if hit.numel() == 0:
                continue
            top = scores[hit].topk(min(k, part.shape[0]), dim=1, sorted=False)
            merged = torch.cat([best[hit], top.values], dim=1)
            merged_rows = torch.cat([rows[hit], top.indices + start], dim=1)
            keep = merged.topk(k, dim=1)  # sorted: column -1 is the bar to beat
            best[hit], rows[hit] = keep.values, merged_rows.gather(1, keep.indices)
        scores_out.append(best.masked_fill(best <= last, float("-inf")))
        rows_out.append(rows)
    if not scores_out:
        return queries.new_zeros(0, k), torch.zeros(0, k, dtype=torch.long)
    return torch.cat(scores_out), torch.cat(rows_out)
