"""Building an index from a trained run and a prepared-data folder."""

from __future__ import annotations

from pathlib import Path

from ssbctl.data.store import FeatureStore
from ssbctl.data.video import DecodeError, Sampling, read_frames
from ssbctl.engine.run import LoadedRun
from ssbctl.evaluation.evaluate import embed_features
from ssbctl.retrieval.index import Index
from ssbctl.retrieval.videos import thumb_name, thumbnail_png


def _thumbnail(path: str) -> bytes | None:
    try:
        return thumbnail_png(read_frames(Path(path), Sampling(num_frames=1))[0])
    except DecodeError:
        return None


def index_store(run: LoadedRun, store: FeatureStore, splits: list[str] | None = None,
                thumbnails: bool = True) -> Index:
    """Embed every video of ``splits`` (all splits when None) of a prepared store; a thumbnail is
    taken from each source video that is still on disk."""
    videos = [v for v in store.videos if splits is None or v["split"] in splits]
    embeddings = embed_features(run.model, store.load_experts(videos), run.device)
    records, thumbs = [], {}
    for v in videos:
        record = {"video_id": v["video_id"], "path": v["path"], "split": v["split"],
                  **({"decoder": v["decoder"]} if "decoder" in v else {})}
        png = _thumbnail(v["path"]) if thumbnails and v["path"] else None
        if png is not None:
            record["thumb"] = thumb_name(Path(v["path"]))
            thumbs[record["thumb"]] = png
        records.append(record)
    meta = {"run": str(Path(run.run_dir).resolve()), "checkpoint": run.checkpoint.name,
            "source": str(store.root.resolve())}
    return Index(embeddings, records, meta, thumbs=thumbs)
