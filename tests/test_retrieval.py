"""Exact top-k search and the index folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ssbctl.core.errors import UserError
from ssbctl.retrieval.index import Index
from ssbctl.retrieval.scan import topk_search


@pytest.mark.parametrize("query_block", [2, 1024])  # 2: the chunked loop; 1024: one product where it fits
@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
def test_chunked_topk_equals_brute_force(chunk: int, query_block: int) -> None:
    # float64: the chunked and the whole product may round differently (another CPU, another
    # shape); in fp32 a near-tie could then swap two indices
    torch.manual_seed(0)
    gallery = F.normalize(torch.randn(300, 16, dtype=torch.float64), dim=-1)
    queries = F.normalize(torch.randn(9, 16, dtype=torch.float64), dim=-1)
    scores, rows = topk_search(queries, gallery, 10, chunk=chunk, query_block=query_block)
    ref = (queries @ gallery.t()).topk(10, dim=1)
    torch.testing.assert_close(scores, ref.values)
    assert torch.equal(rows, ref.indices)


def test_k_larger_than_gallery() -> None:
    scores, rows = topk_search(torch.eye(3), torch.eye(3)[:2], 5, chunk=1)
    assert rows.shape == (3, 2) and rows[0, 0] == 0 and rows[1, 0] == 1


def test_index_round_trip_and_search(tmp_path: Path) -> None:
    emb = torch.eye(4)
    videos = [{"video_id": f"v{i}", "path": f"/videos/v{i}.mp4", "split": "test"} for i in range(4)]
    Index(emb, videos, {"run": "/runs/x", "checkpoint": "step-00000001"}).save(tmp_path / "idx", torch.float16)
    idx = Index.load(tmp_path / "idx")
    assert idx.meta["count"] == 4 and idx.meta["dtype"] == "float16" and idx.meta["run"] == "/runs/x"
    hits = idx.search(torch.tensor([[0.0, 0.0, 1.0, 0.0]]), k=2)[0]
    assert hits[0] == {"rank": 1, "video_id": "v2", "score": 1.0, "path": "/videos/v2.mp4"}
    assert hits[1]["rank"] == 2 and hits[1]["score"] == 0.0
    with pytest.raises(UserError, match="no index"):
        Index.load(tmp_path / "nothing")


def test_faiss_ivf_backend_states_its_recall(tmp_path: Path) -> None:
    from ssbctl.retrieval.ann import ann_search, build_ann

    torch.manual_seed(0)
    centres = F.normalize(torch.randn(20, 32), dim=-1)
    emb = F.normalize(centres[torch.randint(0, 20, (3000,))] + 0.3 * torch.randn(3000, 32), dim=-1)
    videos = [{"video_id": f"v{i}", "path": "", "split": ""} for i in range(3000)]
    Index(emb, videos).save(tmp_path / "idx")
    info = build_ann(emb, tmp_path / "idx", nprobe=8)
    assert info["factory"].startswith("IVF") and 0.5 <= info["recall@10"] <= 1.0
    queries = emb[:50]
    scores, rows = ann_search(tmp_path / "idx", queries, 10)
    assert rows.shape == (50, 10) and torch.all(rows[:, 0] == torch.arange(50))  # each finds itself
    exact = Index.load(tmp_path / "idx")
    approx = Index.load(tmp_path / "idx")
    approx.backend = "faiss"
    agree = [len(set(a.tolist()) & set(b.tolist())) / 10 for a, b in
             zip(approx.top(queries, 10)[1], exact.top(queries, 10)[1])]
    assert sum(agree) / len(agree) >= 0.5


def _clustered_ivf_index(folder: Path) -> Index:
    """Four tight, orthogonal clusters of 10 videos in an ``IVF4,Flat`` faiss index probing one cell:
    a query finds at most the 10 videos of its own cluster, whatever k asks."""
    from ssbctl.retrieval.ann import build_ann

    torch.manual_seed(0)
    emb = F.normalize(torch.eye(8)[torch.arange(40) // 10] + 0.05 * torch.randn(40, 8), dim=-1)
    Index(emb, [{"video_id": f"v{i}", "path": f"/v{i}.mp4", "split": "test"} for i in range(40)]).save(folder)
    build_ann(emb, folder, factory="IVF4,Flat", nprobe=1, sample=40, k=5)
    index = Index.load(folder)
    index.backend = "faiss"
    return index


def test_faiss_slots_it_cannot_fill_are_dropped_not_the_last_video(tmp_path: Path) -> None:
    """faiss answers row -1 for the k - 10 slots beyond the probed cell; they must not become v39."""
    from ssbctl.retrieval.explain import dual_softmax

    index = _clustered_ivf_index(tmp_path / "idx")
    queries = index.embeddings[[0, 15]]  # clusters 0 and 1; the last video v39 is in cluster 3
    hits = index.search(queries, k=25)
    for q, row in enumerate(hits):
        cluster = {f"v{i}" for i in range(10 * q, 10 * q + 10)}
        assert [h["rank"] for h in row] == list(range(1, 11))
        assert {h["video_id"] for h in row} == cluster
        exact = (queries[q] @ index.embeddings.t()).double()
        for h in row:
            assert h["score"] == pytest.approx(float(exact[int(h["video_id"][1:])]), abs=1e-5)
    scores, rows = index.top(queries, 25)
    assert [len(r) for r in rows] == [len(s) for s in scores] == [10, 10]
    reranked = dual_softmax(index, queries, index.embeddings[30:33], k=25, candidates=25)
    assert [{h["video_id"] for h in row} for row in reranked] == [{f"v{i}" for i in range(10)},
                                                                  {f"v{i}" for i in range(10, 20)}]
