"""Exact top-k inner-product search that screens in bfloat16 and re-scores in float64.

Why: a flat fp32 scan (``torch.mm`` or faiss ``IndexFlatIP``) is bound by the fp32 matrix-multiply
rate. On CPUs with bf16 matrix units (AMX, AVX512-BF16) a bf16 product of the same shape runs
several times faster, but rounds. Here the bf16 scores only *screen*: every row whose exact score
could still reach the top-k is kept, and those few candidates are re-scored in float64, so the
result is the exact top-k, not an approximation.

Bound. Write ``s(x) = q . x`` for the exact (real) inner product of the stored fp32 vectors,
``qb, xb`` for their bf16 roundings, ``a(x)`` for the fp32 sum the bf16 product forms and
``t(x) = bf16(a(x))`` for the screening score. With ``u = 2^-8`` (bf16 unit roundoff),
``g = D 2^-24 / (1 - D 2^-24)`` (fp32 summation of ``D`` exact products, any order),
``X = max ||x||`` and ``E = max ||x - xb||`` over the gallery (measured once, rounded up):
``q.x - qb.xb = (q - qb).x + qb.(x - xb)``, so ``|s - qb.xb| <= ||q - qb|| X + ||qb|| E``, and
``|a - qb.xb| <= g ||qb|| (X + E)``. Call the sum of these ``B1`` (times ``1 + 2^-10`` and plus
``2^-20 ||q|| X + D 2^-120 (1 + ||q||)(1 + X)`` for the rounding of the bound itself and subnormals
flushed to zero). Rounding ``a`` to bf16 gives ``|t - a| <= u |a| <= u' |t|``, ``u' = u / (1 - u)``.
Hence ``lo(t) <= s <= up(t)`` with ``lo(t) = t - u'|t| - B1`` and ``up(t) = t + u'|t| + B1``, both
increasing in ``t``.

Also ``|s - f| <= c = (D + 1) 2^-24 / (1 - (D + 1) 2^-24) ||q|| X`` for an fp32 product score ``f``.

Proof that the top-k is exact. Pass 1 streams the gallery in chunks, in bf16, and keeps per query
only the largest ``t`` of each group of consecutive rows. ``L``, the k-th largest group maximum,
is reached by k distinct rows, so the exact k-th best score ``tau >= lo(L)``. (i) A row of a group
whose maximum is below ``bar(L) = up^-1(lo(L))`` (rounded down) has ``up(t) < lo(L) <= tau``, so
``s < tau``: it can neither be in the top-k nor tie with it. Pass 1 therefore keeps only the
(query, group) pairs that reach ``bar`` of the running ``L``; ``L`` and ``bar`` only grow, so a pair
dropped early is dropped by the final ``bar`` too. (ii) Pass 2 scores the rows of the kept groups
in fp32 and keeps those with ``f >= lo(L) - c``: a row below has ``s <= f + c < lo(L) <= tau``.
So every row with ``s >= tau`` is kept, at least k of them; with ``f_k`` the k-th largest kept
``f``, ``tau >= f_k - c``, and (iii) a row with ``f < f_k - 2 c`` has ``s < tau`` and is dropped.
Re-scoring the survivors in float64 (fp32 products are exact in float64; the sum of ``D`` of them
is off by under ``D 2^-53`` relative) and sorting by (score desc, row asc) gives the top-k of the
whole gallery, ties broken by row. The bound assumes the bf16 product accumulates in fp32, as
oneDNN's and PyTorch's CPU kernels do; :func:`bf16_accumulates_in_fp32` checks it once, on the
layouts used, and the search falls back to the fp32 scan when it does not hold.

Fallbacks to the plain fp32 scan (:func:`ssbctl.retrieval.scan.topk_search`, exact up to fp32
rounding): non-finite values, ``k >= N``, fewer than ``k`` groups, and any query that keeps more
than ``cap_groups`` groups (the bound does not prune: a zero query, all rows equal, many
near-ties). Memory above the data: one ``chunk x query_block`` bf16 score block, the kept pairs
(about ``k log(N)`` per query for random data, pruned every 8 chunks) and at most
``query_block x cap_groups x group`` pass-2 candidates, whatever ``N``; the bf16 copy of the
gallery (half the fp32 data) is made once, when the gallery is built.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

BF16_ROUNDOFF = 2.0 ** -8
FP32_ROUNDOFF = 2.0 ** -24


@functools.lru_cache(maxsize=1)
def bf16_accumulates_in_fp32() -> bool:
    """Whether ``torch.mm`` on bf16 sums in fp32 here (the bound relies on it): ``1 + 256 x 2^-9``
    is 1.5 when summed in fp32 but stays 1 when every partial sum is rounded to bf16. Checked on a
    small and a large product, with the transposed gallery layout the search uses."""
    for rows, cols in ((1, 16), (256, 2048)):
        a = torch.full((rows, 257), 2.0 ** -9, dtype=torch.bfloat16)
        a[:, 0] = 1.0
        b = torch.ones(cols, 257, dtype=torch.bfloat16)
        if not bool((torch.mm(a, b.t()).float() == 1.5).all()):
            return False
    return True


@dataclass
class ScreenedGallery:
    """A gallery ready for screened search: the fp32 rows, their bf16 copy, and ``X`` and ``E`` of
    the bound (largest row norm, largest norm of a row's bf16 rounding error)."""

    rows: torch.Tensor  # (N, D) float32
    low: torch.Tensor  # (N, D) bfloat16
    max_norm: float  # X (float64, rounded up)
    max_error: float  # E (float64, rounded up)
    finite: bool

    @classmethod
    def build(cls, gallery: torch.Tensor, chunk: int = 16384) -> ScreenedGallery:
        """Cast ``gallery`` to fp32 and bf16 and measure ``X`` and ``E`` (chunked: no full-size temporaries)."""
        rows = gallery.float().contiguous()
        low = torch.empty(rows.shape, dtype=torch.bfloat16)
        norm, error, finite = 0.0, 0.0, True
        for start in range(0, rows.shape[0], chunk):
            part = rows[start:start + chunk]
            low[start:start + chunk] = part
            finite = finite and bool(torch.isfinite(part).all())
            if part.numel():  # x - bf16(x) is exact in fp32; the fp32 norms are padded below
                norm = max(norm, float(part.norm(dim=1).max()))
                error = max(error, float((part - low[start:start + chunk].float()).norm(dim=1).max()))
        pad = 1 + (rows.shape[1] + 2) * 2.0 ** -23  # covers the fp32 rounding of a norm of D terms
        return cls(rows, low, norm * pad, error * pad, finite)

    def bound(self, queries: torch.Tensor) -> torch.Tensor:
        """``B1`` of the bound for each query (float64): how far the fp32 sum of the bf16 product
        may be from the exact score, before that sum is rounded to bf16."""
        d = self.rows.shape[1]
        g = d * FP32_ROUNDOFF / (1 - d * FP32_ROUNDOFF)
        q = queries.double()
        qb = queries.to(torch.bfloat16).double()
        nq, nqb, neq = q.norm(dim=1), qb.norm(dim=1), (q - qb).norm(dim=1)
        x, e = self.max_norm, self.max_error
        b1 = neq * x + nqb * e + g * nqb * (x + e)
        return b1 * (1 + 2.0 ** -10) + 2.0 ** -20 * nq * x + d * 2.0 ** -120 * (1 + nq) * (1 + x)


    def fp32_bound(self, queries: torch.Tensor) -> torch.Tensor:
        """``c`` of the bound for each query (float64): how far an fp32 product score may be from
        the exact one, ``(D + 1) 2^-24 / (1 - (D + 1) 2^-24) ||q|| X``, padded like ``B1``."""
        d = self.rows.shape[1] + 1
        nq = queries.double().norm(dim=1)
        return nq * self.max_norm * (d * FP32_ROUNDOFF / (1 - d * FP32_ROUNDOFF) * (1 + 2.0 ** -10) + 2.0 ** -20) \
            + d * 2.0 ** -120 * (1 + nq) * (1 + self.max_norm)


def lower(level: torch.Tensor, b1: torch.Tensor) -> torch.Tensor:
    """``lo(level)``: the least exact score a row with bf16 score ``level`` can have (float64)."""
    level = level.double()
    return level - BF16_ROUNDOFF / (1 - BF16_ROUNDOFF) * level.abs() - b1


def bar_for(level: torch.Tensor, b1: torch.Tensor) -> torch.Tensor:
    """The least bf16 score whose upper bound reaches ``lo(level)``: ``up^-1(lo(level))`` (see the
    module docstring), in float64, then rounded down to float32."""
    u = BF16_ROUNDOFF / (1 - BF16_ROUNDOFF)
    target = lower(level, b1) - b1
    return round_down(torch.where(target >= 0, target / (1 + u), target / (1 - u)))


def round_down(value: torch.Tensor) -> torch.Tensor:
    """A float64 tensor rounded to a float32 no larger than it."""
    low = value.float()
    return torch.where(low.double() > value, torch.nextafter(low, torch.full_like(low, float("-inf"))), low)


def screened_topk(queries: torch.Tensor, gallery: ScreenedGallery, k: int, chunk: int = 4096, group: int = 16,
                  query_block: int = 1024, cap_groups: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``k`` (scores float32, rows int64), best first, of ``queries (Q, D)`` over the
    gallery; see the module docstring for why it is exact and when it falls back to fp32."""
    from ssbctl.retrieval.scan import topk_search

    queries = queries.float()
    n = gallery.rows.shape[0]
    group = max(1, min(group, chunk))
    chunk -= chunk % group  # whole groups per chunk
    if (k <= 0 or k >= n or n // group < k or not gallery.finite or not bool(torch.isfinite(queries).all())
            or gallery.max_norm * (float(queries.norm(dim=1).max()) if len(queries) else 0.0) > 1e30
            or not bf16_accumulates_in_fp32()):
        return topk_search(queries, gallery.rows, k, chunk=chunk, query_block=query_block)
    cap_groups = cap_groups or max(64, 4 * k)
    scores = torch.empty(queries.shape[0], k)
    rows = torch.empty(queries.shape[0], k, dtype=torch.long)
    for qs in range(0, queries.shape[0], query_block):
        block = queries[qs:qs + query_block]
        b1, c = gallery.bound(block), gallery.fp32_bound(block)
        if len(block) * n <= query_block * chunk:  # a few queries: every row's bf16 score at once
            done = _screen_whole(block, gallery, k, b1, group * cap_groups, scores[qs:qs + len(block)],
                                 rows[qs:qs + len(block)])
            if not bool(done.all()):
                redo = torch.nonzero(~done).flatten()
                s, r = topk_search(block[redo], gallery.rows, k, chunk=chunk, query_block=query_block)
                scores[qs + redo], rows[qs + redo] = s, r
            continue
        level, pair_q, pair_g, done = _screen(block.to(torch.bfloat16), gallery.low, k, b1, chunk, group,
                                              16 * cap_groups)  # pass 1
        done &= torch.bincount(pair_q, minlength=len(block)) <= cap_groups
        keep = done[pair_q]
        cand_q, cand_r, cand_t = _revisit(block, gallery.rows, pair_q[keep], pair_g[keep], group,
                                          round_down(lower(level, b1) - c))  # pass 2
        cand_q, cand_r = _final_filter(cand_q, cand_r, cand_t, k, c)
        done &= _rescore(block, gallery.rows, k, cand_q, cand_r, scores[qs:qs + len(block)],
                         rows[qs:qs + len(block)])
        if not bool(done.all()):  # the bound did not prune for these queries: plain fp32 scan
            redo = torch.nonzero(~done).flatten()
            s, r = topk_search(block[redo], gallery.rows, k, chunk=chunk, query_block=query_block)
            scores[qs + redo], rows[qs + redo] = s, r
    return scores, rows


def _screen_whole(block: torch.Tensor, gallery: ScreenedGallery, k: int, b1: torch.Tensor, cap: int,
                  scores: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Pass 1 and 2 for a few queries (a served search): the bf16 scores of every row in one
    product; ``L`` is each query's k-th largest, reached by k distinct rows, so the rows with
    ``t >= bar(L)`` hold every row that can be in the top-k (module docstring, step (i), with
    groups of one row). They are re-scored in float64 and the best ``k`` written to ``scores``
    and ``rows``. Returns which queries are done: one with more than ``cap`` candidates (the
    bound does not prune) is left for the caller's fp32 scan."""
    t = torch.mm(block.to(torch.bfloat16), gallery.low.t()).float()  # (Q, N)
    level = t.topk(k, dim=1).values[:, -1]
    cand_q, cand_r = torch.nonzero(t >= bar_for(level, b1)[:, None], as_tuple=True)
    done = torch.bincount(cand_q, minlength=len(block)) <= cap
    keep = done[cand_q]
    return _rescore(block, gallery.rows, k, cand_q[keep], cand_r[keep], scores, rows) & done


def _screen(low: torch.Tensor, gallery: torch.Tensor, k: int, b1: torch.Tensor, chunk: int, group: int,
            cap: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pass 1: bf16 scores, reduced to the maximum of each group of ``group`` consecutive rows.
    Keeps a running ``L`` (k-th largest group maximum so far, so k distinct rows reach it) and
    the (query, group) pairs whose maximum reaches ``bar(L)``; ``L`` only grows, so the final
    filter drops nothing the final ``bar(L)`` keeps. A query holding more than ``cap`` pairs is
    given up on (memory stays bounded). Returns the final ``L``, the pairs and which queries were
    not given up on. Rows past the last whole group form one more, shorter group."""
    nq, n = low.shape[0], gallery.shape[0]
    best = torch.full((nq, k), float("-inf"))
    bar = torch.full((nq,), float("-inf"))
    alive, held = torch.ones(nq, dtype=torch.bool), torch.zeros(nq, dtype=torch.long)
    pair_q, pair_g, pair_m = [], [], []
    buffer = torch.empty(min(chunk, n), nq, dtype=torch.bfloat16)  # rows x queries: the group max
    for start in range(0, n, chunk):                                 # then runs over whole query rows
        part = gallery[start:start + chunk]
        t = buffer[: part.shape[0]]
        torch.mm(part, low.t(), out=t)
        full = part.shape[0] // group
        maxima = t[: full * group].view(full, group, nq).amax(dim=1)
        if part.shape[0] % group:
            maxima = torch.cat([maxima, t[full * group:].amax(dim=0, keepdim=True)])
        maxima = maxima.t().float()  # (nq, groups in this chunk)
        best = torch.cat([best, maxima], dim=1).topk(k, dim=1).values
        bar = torch.where(alive, bar_for(best[:, -1], b1), float("inf"))
        qi, gi = torch.nonzero(maxima >= bar[:, None], as_tuple=True)
        pair_q.append(qi)
        pair_g.append(gi + start // group)
        pair_m.append(maxima[qi, gi])
        held += torch.bincount(qi, minlength=nq)  # bar is +inf for a query given up on
        if len(pair_q) >= 8 or bool((held > cap).any()):  # drop pairs below the risen bar
            pair_q, pair_g, pair_m = _merge_pairs(pair_q, pair_g, pair_m, bar)
            held = torch.bincount(pair_q[0], minlength=nq)
            alive &= held <= cap  # still too many: given up on, its pairs dropped at the next merge
    pair_q, pair_g, _ = _merge_pairs(pair_q, pair_g, pair_m, torch.where(alive, bar, float("inf")))
    return best[:, -1], pair_q[0], pair_g[0], alive


def _merge_pairs(pair_q: list[torch.Tensor], pair_g: list[torch.Tensor], pair_m: list[torch.Tensor],
                 bar: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """The pairs whose group maximum still reaches its query's bar, in one tensor each."""
    q, g, m = torch.cat(pair_q), torch.cat(pair_g), torch.cat(pair_m)
    keep = m >= bar[q]
    return [q[keep]], [g[keep]], [m[keep]]


def _revisit(block: torch.Tensor, rows: torch.Tensor, pair_q: torch.Tensor, pair_g: torch.Tensor, group: int,
             floor: torch.Tensor, pairs_per_step: int = 512) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pass 2: fp32 scores of every row of the kept (query, group) pairs; the rows whose score
    reaches ``floor = lo(L) - c`` of their query (every row that can be in the top-k does).
    Returns the candidates' query, row and fp32 score."""
    n, d = rows.shape
    whole = rows[: n - n % group].view(-1, group, d)  # groups as blocks: a pair gathers one block
    cand_q, cand_r, cand_t = [], [], []
    for lo in range(0, pair_q.shape[0], pairs_per_step):
        q, g = pair_q[lo:lo + pairs_per_step], pair_g[lo:lo + pairs_per_step]
        tail = g >= whole.shape[0]  # the shorter last group
        if bool(tail.any()):
            tq = q[tail]
            t = torch.mm(block[tq], rows[whole.shape[0] * group:].t())
            pi, oi = torch.nonzero(t >= floor[tq, None], as_tuple=True)
            cand_q.append(tq[pi])
            cand_r.append(oi + whole.shape[0] * group)
            cand_t.append(t[pi, oi])
            q, g = q[~tail], g[~tail]
        t = torch.bmm(whole.index_select(0, g), block.index_select(0, q)[:, :, None]).squeeze(2)  # (P, group)
        pi, oi = torch.nonzero(t >= floor[q, None], as_tuple=True)
        cand_q.append(q[pi])
        cand_r.append(g[pi] * group + oi)
        cand_t.append(t[pi, oi])
    if not cand_q:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.zeros(0)
    return torch.cat(cand_q), torch.cat(cand_r), torch.cat(cand_t)


def _final_filter(cand_q: torch.Tensor, cand_r: torch.Tensor, cand_t: torch.Tensor, k: int,
                  c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The candidates whose fp32 score reaches ``t_k - 2 c``, ``t_k`` being the k-th largest fp32
    score among a query's candidates (a query with fewer than ``k`` keeps none: it is then redone)."""
    nq = c.shape[0]
    order = torch.sort(cand_t, descending=True, stable=True).indices
    order = order[torch.sort(cand_q[order], stable=True).indices]
    counts = torch.bincount(cand_q, minlength=nq)
    first = torch.cumsum(counts, 0) - counts
    tk = torch.full((nq,), float("inf"))
    enough = counts >= k
    tk[enough] = cand_t[order[first[enough] + k - 1]]
    keep = cand_t >= round_down(tk.double() - 2 * c)[cand_q]  # inf stays inf: such a query keeps nothing
    return cand_q[keep], cand_r[keep]


def _rescore(block: torch.Tensor, rows: torch.Tensor, k: int, cand_q: torch.Tensor, cand_r: torch.Tensor,
             scores: torch.Tensor, rows_out: torch.Tensor, slice_rows: int = 4096) -> torch.Tensor:
    """Float64 scores of the candidates; each query's best ``k`` (score desc, row asc) written to
    ``scores`` and ``rows_out``. Returns which queries had ``k`` candidates (the others, given up
    on, are left for the caller to fill)."""
    exact = torch.empty(cand_q.shape[0], dtype=torch.float64)
    for lo in range(0, cand_q.shape[0], slice_rows):
        q, r = cand_q[lo:lo + slice_rows], cand_r[lo:lo + slice_rows]
        exact[lo:lo + slice_rows] = (block[q].double() * rows[r].double()).sum(dim=1)
    order = torch.sort(cand_r, stable=True).indices
    order = order[torch.sort(exact[order], descending=True, stable=True).indices]
    order = order[torch.sort(cand_q[order], stable=True).indices]
    counts = torch.bincount(cand_q, minlength=block.shape[0])
    first = torch.cumsum(counts, 0) - counts
    settled = counts >= k
    pick = order[(first[settled, None] + torch.arange(k)).flatten()].view(-1, k)
    scores[settled], rows_out[settled] = exact[pick].float(), cand_r[pick]
    return settled


SCREEN_MIN_ROWS = 200_000  # below, the screen's fixed costs lose to the fp32 scan (benchmarks/retrieval.py)


def screening_pays(rows: int) -> bool:
    """Whether the bf16 screen is worth it: a CPU with AMX tiles (bf16 products several times the
    fp32 rate; elsewhere bf16 can be slower than fp32) and a gallery of ``SCREEN_MIN_ROWS`` or more.

    Not for fewer rows, even for a few queries, where one process measures the screen twice as
    fast as the fp32 product at 100,000 rows: inside ``ssbctl serve`` (8 concurrent clients,
    batches of 8, ``benchmarks/serve.py``) the whole search was p95 72 and 116 ms with the screen
    at 100,000 rows against 90 and 75 ms without it: no gain beyond the run-to-run spread."""
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return rows >= SCREEN_MIN_ROWS and callable(amx) and bool(amx())


def exact_topk(queries: torch.Tensor, embeddings: torch.Tensor, k: int,
               cache: dict[str, object]) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``k`` of ``queries`` over ``embeddings``: screened where that pays, else the fp32
    scan. ``cache`` keeps the gallery's bf16 copy between calls (rebuilt when the tensor changes)."""
    from ssbctl.retrieval.scan import topk_search

    if not screening_pays(embeddings.shape[0]):
        return topk_search(queries.float(), embeddings.float(), k)
    key = (embeddings.data_ptr(), tuple(embeddings.shape), embeddings.dtype, embeddings._version)
    if cache.get("key") != key:
        cache.clear()
        cache["gallery"], cache["key"] = ScreenedGallery.build(embeddings), key
    gallery = cache["gallery"]
    assert isinstance(gallery, ScreenedGallery)
    return screened_topk(queries, gallery, k)
