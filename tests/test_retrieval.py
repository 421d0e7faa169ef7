"""Exact top-k search and the index folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ssbctl.errors import UserError
from ssbctl.retrieval.index import Index, topk_search


@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
def test_chunked_topk_equals_brute_force(chunk: int) -> None:
    # float64: the chunked and the whole product may round differently (another CPU, another
    # shape); in fp32 a near-tie could then swap two indices
    torch.manual_seed(0)
    gallery = F.normalize(torch.randn(300, 16, dtype=torch.float64), dim=-1)
    queries = F.normalize(torch.randn(9, 16, dtype=torch.float64), dim=-1)
    scores, rows = topk_search(queries, gallery, 10, chunk=chunk)
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
