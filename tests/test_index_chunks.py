"""Indexing a prepared store reads and embeds its features a chunk of videos at a time, so that
``ssbctl index``'s memory does not grow with the store's features (issue 15, goal 4)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ssbctl.data.store import FeatureStore


class CountingStore(FeatureStore):
    """A real store that records how many videos each ``load_experts`` call reads."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.loads: list[int] = []

    def load_experts(self, videos: list[dict[str, Any]]) -> list[list[torch.Tensor]]:
        self.loads.append(len(videos))
        return super().load_experts(videos)


def test_index_store_reads_features_chunk_by_chunk(tiny_run: Path, shapes_store: Path) -> None:
    """It used to load every video's features at once (peak memory grew with the store)."""
    from ssbctl.inference.run import load_run
    from ssbctl.retrieval.build import index_store

    run = load_run(tiny_run, device="cpu")
    store = CountingStore(shapes_store)
    index = index_store(run, store, thumbnails=False, chunk=7)
    total = len(store.videos)
    assert total > 14  # at least three chunks, the last one partial
    assert store.loads == [min(7, total - start) for start in range(0, total, 7)]
    whole = run.encode_features(FeatureStore(shapes_store).load_experts(store.videos))
    assert [row["video_id"] for row in index.videos] == [v["video_id"] for v in store.videos]
    torch.testing.assert_close(index.embeddings.double(), whole.double(), atol=1e-5, rtol=0)
