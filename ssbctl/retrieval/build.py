"""Building an index from a trained run and a prepared-data folder."""

from __future__ import annotations

from pathlib import Path

from ssbctl.data.store import FeatureStore
from ssbctl.engine.run import LoadedRun
from ssbctl.evaluation.evaluate import embed_features
from ssbctl.retrieval.index import Index


def index_store(run: LoadedRun, store: FeatureStore, splits: list[str] | None = None) -> Index:
    """Embed every video of ``splits`` (all splits when None) of a prepared store."""
    videos = [v for v in store.videos if splits is None or v["split"] in splits]
    embeddings = embed_features(run.model, store.load_experts(videos), run.device)
    records = [{"video_id": v["video_id"], "path": v["path"], "split": v["split"]} for v in videos]
    meta = {"run": str(Path(run.run_dir).resolve()), "checkpoint": run.checkpoint.name,
            "source": str(store.root.resolve())}
    return Index(embeddings, records, meta)
