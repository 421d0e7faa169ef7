"""The bf16-screened exact search (ssbctl.retrieval.exact) returns exactly the brute-force top-k,
on ordinary and adversarial galleries, and falls back to the fp32 scan where its bound cannot prune."""

from __future__ import annotations

import pytest
import torch

from ssbctl.retrieval import exact as exact_module
from ssbctl.retrieval import scan as scan_module
from ssbctl.retrieval.exact import BF16_ROUNDOFF, ScreenedGallery, bf16_accumulates_in_fp32, exact_topk, screened_topk
from ssbctl.retrieval.index import Index

SMALL = {"chunk": 64, "group": 8, "query_block": 16}  # many chunks, groups and blocks on a small gallery
WHOLE = {"chunk": 4096, "group": 8, "query_block": 1024}  # a few queries: one bf16 product over every row
LAYOUTS = pytest.mark.parametrize("layout", [SMALL, WHOLE], ids=["chunked", "whole"])


def reference(queries: torch.Tensor, gallery: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Brute force in float64: best score first, ties by lower row."""
    exact = queries.double() @ gallery.double().t()
    rows = torch.arange(gallery.shape[0])
    out_s, out_r = [], []
    for line in exact:
        order = sorted(range(len(line)), key=lambda i: (-float(line[i]), i))[:k]
        out_s.append(line[order])
        out_r.append(rows[order])
    return torch.stack(out_s), torch.stack(out_r)


def unit(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def no_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the fp32 fallback fail: the screened path alone must produce the result."""
    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("fell back to the fp32 scan")
    monkeypatch.setattr(scan_module, "topk_search", refuse)


def clustered(n: int, dim: int, centres: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    c = torch.nn.functional.normalize(torch.randn(centres, dim, generator=g), dim=1)
    labels = torch.sort(torch.randint(0, centres, (n,), generator=g)).values  # rows sorted by cluster
    return torch.nn.functional.normalize(c[labels] + 0.3 * torch.randn(n, dim, generator=g) / dim ** 0.5, dim=1)


@pytest.mark.parametrize("k", [1, 5, 10])
@LAYOUTS
def test_random_gallery_equals_brute_force(k: int, monkeypatch: pytest.MonkeyPatch, layout: dict[str, int]) -> None:
    gallery, queries = unit(3000, 32), unit(40, 32, seed=1)
    no_fallback(monkeypatch)
    scores, rows = screened_topk(queries, ScreenedGallery.build(gallery), k, **layout)
    ref_s, ref_r = reference(queries, gallery, k)
    assert torch.equal(rows, ref_r)
    assert torch.allclose(scores.double(), ref_s, rtol=0, atol=1e-7)


@LAYOUTS
def test_clustered_sorted_gallery(monkeypatch: pytest.MonkeyPatch, layout: dict[str, int]) -> None:
    gallery = clustered(4000, 32, 50)
    queries = torch.cat([gallery[::200] + 0.01 * unit(20, 32, seed=3), unit(10, 32, seed=4)])
    no_fallback(monkeypatch)
    scores, rows = screened_topk(queries, ScreenedGallery.build(gallery), 10, **layout)
    assert torch.equal(rows, reference(queries, gallery, 10)[1])


@LAYOUTS
def test_near_ties_below_bf16_resolution(monkeypatch: pytest.MonkeyPatch, layout: dict[str, int]) -> None:
    """Scores that differ by ~1e-7, far below bf16's resolution (~1e-3): only the re-scoring can order them."""
    base = unit(1, 32)
    gallery = torch.cat([base + 1e-6 * unit(300, 32, seed=5), unit(2000, 32, seed=6)])
    queries = torch.cat([base, base + 1e-4 * unit(5, 32, seed=7)])
    no_fallback(monkeypatch)
    scores, rows = screened_topk(queries, ScreenedGallery.build(gallery), 10, **layout)
    assert torch.equal(rows, reference(queries, gallery, 10)[1])


@pytest.mark.parametrize("layout", [{**SMALL, "group": 2, "cap_groups": 400}, WHOLE], ids=["chunked", "whole"])
@pytest.mark.parametrize("spread", [3e-3, 1e-2, 3e-2])
def test_bf16_rounding_reorders_the_boundary(spread: float, monkeypatch: pytest.MonkeyPatch,
                                             layout: dict[str, int]) -> None:
    """Rows whose exact scores differ by about bf16's rounding error of a score: the bf16 order
    is not the exact order around the k-th row, so keeping only rows at or above the k-th bf16
    score (no bound) misses some of the true top-k."""
    base = unit(1, 32, seed=24)
    gallery = torch.cat([base + spread * unit(400, 32, seed=25), unit(1000, 32, seed=26)])
    queries = torch.cat([base, base + spread * unit(3, 32, seed=27)])
    no_fallback(monkeypatch)
    scores, rows = screened_topk(queries, ScreenedGallery.build(gallery), 10, **layout)
    assert torch.equal(rows, reference(queries, gallery, 10)[1])


@LAYOUTS
def test_duplicates_tie_by_row(monkeypatch: pytest.MonkeyPatch, layout: dict[str, int]) -> None:
    gallery = unit(700, 32, seed=8).repeat_interleave(3, dim=0)  # every row three times: exact ties
    queries = unit(12, 32, seed=9)
    no_fallback(monkeypatch)
    scores, rows = screened_topk(queries, ScreenedGallery.build(gallery), 10, **layout)
    assert torch.equal(rows, reference(queries, gallery, 10)[1])


def check_tied_result(queries: torch.Tensor, gallery: torch.Tensor, k: int, scores: torch.Tensor,
                      rows: torch.Tensor) -> None:
    """Where ties make the rows ambiguous: distinct rows whose exact scores are the best ``k``."""
    ref_s, _ = reference(queries, gallery, k)
    exact = (queries.double() @ gallery.double().t()).gather(1, rows)
    assert all(len(set(r.tolist())) == len(r) for r in rows)
    assert torch.allclose(exact, ref_s, rtol=0, atol=1e-6)
    assert torch.allclose(scores.double(), ref_s, rtol=0, atol=1e-6)


@LAYOUTS
def test_all_rows_equal_falls_back_exactly(layout: dict[str, int]) -> None:
    gallery = unit(1, 32).repeat(1000, 1)
    queries = unit(6, 32, seed=10)
    scores, rows = screened_topk(queries, ScreenedGallery.build(gallery), 10, **layout)
    check_tied_result(queries, gallery, 10, scores, rows)


@LAYOUTS
def test_zero_vectors(layout: dict[str, int]) -> None:
    gallery = torch.cat([unit(800, 32, seed=11), torch.zeros(200, 32)])
    queries = torch.cat([unit(5, 32, seed=12), torch.zeros(2, 32)])  # a zero query ties every row at 0
    scores, rows = screened_topk(queries, ScreenedGallery.build(gallery), 10, **layout)
    check_tied_result(queries, gallery, 10, scores, rows)
    assert torch.equal(rows[:5], reference(queries[:5], gallery, 10)[1])


@pytest.mark.parametrize("k", [999, 1000, 1500])
@LAYOUTS
def test_k_at_least_n(k: int, layout: dict[str, int]) -> None:
    gallery, queries = unit(999, 16, seed=13), unit(3, 16, seed=14)
    scores, rows = screened_topk(queries, ScreenedGallery.build(gallery), k, **layout)
    assert rows.shape == (3, 999)
    check_tied_result(queries, gallery, 999, scores, rows)


@LAYOUTS
def test_non_finite_rows_fall_back(layout: dict[str, int]) -> None:
    gallery = unit(500, 16, seed=15)
    gallery[7, 3] = float("nan")
    scores, rows = screened_topk(unit(2, 16, seed=16), ScreenedGallery.build(gallery), 5, **layout)
    assert 7 not in rows.tolist()[0] and torch.isfinite(scores).all()


def test_bound_holds_for_every_pair() -> None:
    """The proof's bound: |exact - fp32 sum of the bf16 product| <= B1 (+ the bf16 rounding of the sum)."""
    gallery = torch.cat([unit(2000, 64, seed=17), 3 * clustered(2000, 64, 20)])
    queries = torch.cat([unit(50, 64, seed=18), 0.01 * unit(10, 64, seed=19)])
    screened = ScreenedGallery.build(gallery)
    t = torch.mm(queries.to(torch.bfloat16), screened.low.t()).double()
    exact = queries.double() @ gallery.double().t()
    u = BF16_ROUNDOFF / (1 - BF16_ROUNDOFF)
    slack = screened.bound(queries)[:, None] + u * t.abs()
    assert bool(((exact - t).abs() <= slack).all())
    assert float(((exact - t).abs() / slack).max()) > 0.05  # and not uselessly loose
    fp32 = queries @ gallery.t()
    assert bool(((exact - fp32.double()).abs() <= screened.fp32_bound(queries)[:, None]).all())


def test_accumulation_check_runs() -> None:
    assert isinstance(bf16_accumulates_in_fp32(), bool)


def test_index_top_is_exact_and_caches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(exact_module, "SCREEN_MIN_ROWS", 4096)  # screen this small gallery too
    gallery = unit(6000, 32, seed=20)
    index = Index(gallery, [{"video_id": str(i), "path": f"{i}.mp4"} for i in range(6000)])
    queries = unit(7, 32, seed=21)
    ref_s, ref_r = reference(queries, gallery, 10)
    for _ in range(2):
        scores, rows = index.top(queries, 10)
        assert torch.equal(torch.stack(rows), ref_r)
        assert torch.allclose(torch.stack(scores).double(), ref_s, rtol=0, atol=1e-6)
    gallery[ref_r[0, 0]] = -gallery[ref_r[0, 0]]  # changed in place: the cached bf16 copy is rebuilt
    _, rows = index.top(queries, 10)
    assert ref_r[0, 0] not in rows[0].tolist()


def test_exact_topk_without_screening_matches() -> None:
    gallery, queries = unit(100, 16, seed=22), unit(4, 16, seed=23)
    scores, rows = exact_topk(queries, gallery, 5, {})  # under SCREEN_MIN_ROWS: the fp32 scan
    assert torch.equal(rows, reference(queries, gallery, 5)[1])
