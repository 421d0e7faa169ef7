"""Building an index from a trained run and a prepared-data folder."""

from __future__ import annotations

from pathlib import Path

from ssbctl.core.errors import UserError
from ssbctl.data.loader import check_finite_features
from ssbctl.data.store import Store
from ssbctl.data.video import DecodeError, Sampling, read_frames, thumbnail_png
from ssbctl.inference.run import LoadedRun
from ssbctl.retrieval.index import Index, index_meta, thumb_name


def _thumbnail(path: str) -> bytes | None:
    try:
        return thumbnail_png(read_frames(Path(path), Sampling(num_frames=1))[0])
    except DecodeError:
        return None


def index_store(run: LoadedRun, store: Store, splits: list[str] | None = None,
                thumbnails: bool = True) -> Index:
    """Embed every video of ``splits`` (all splits when None) of a prepared store; a thumbnail is
    taken from each source video that is still on disk."""
    known = {v["split"] for v in store.videos}
    unknown = sorted(set(splits or ()) - known)
    if unknown:
        raise UserError(f"--split {unknown[0]}: no such split in {store.root} (splits: {', '.join(sorted(known))})")
    videos = [v for v in store.videos if splits is None or v["split"] in splits]
    if not videos:
        raise UserError(f"{store.root} has no videos to index")
    features = store.load_experts(videos)
    check_finite_features(store, videos, features, ", ".join(splits or sorted(known)))
    embeddings = run.encode_features(features)
    records, thumbs = [], {}
    for v in videos:
        record = {"video_id": v["video_id"], "path": v["path"], "split": v["split"],
                  **({"decoder": v["decoder"]} if "decoder" in v else {})}
        png = _thumbnail(v["path"]) if thumbnails and v["path"] else None
        if png is not None:
            record["thumb"] = thumb_name(Path(v["path"]))
            thumbs[record["thumb"]] = png
        records.append(record)
    return Index(embeddings, records, index_meta(run, store.root), thumbs=thumbs)
