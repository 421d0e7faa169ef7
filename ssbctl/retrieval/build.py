"""Building an index from a trained run and a prepared-data folder."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch

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


INDEX_CHUNK = 4096  # videos whose features are in memory at once while indexing a store


def index_store(run: LoadedRun, store: Store, splits: list[str] | None = None,
                thumbnails: bool = True, chunk: int = INDEX_CHUNK) -> Index:
    """Embed every video of ``splits`` (all splits when None) of a prepared store; a thumbnail is
    taken from each source video that is still on disk.

    Features are read and embedded ``chunk`` videos at a time, so memory grows with the chunk and
    the ``(N, D)`` embeddings, not with the store's features (100k pixels videos are 2.4 GB)."""
    known = {v["split"] for v in store.videos}
    unknown = sorted(set(splits or ()) - known)
    if unknown:
        raise UserError(f"--split {unknown[0]}: no such split in {store.root} (splits: {', '.join(sorted(known))})")
    videos = [v for v in store.videos if splits is None or v["split"] in splits]
    if not videos:
        raise UserError(f"{store.root} has no videos to index")
    parts = []
    for start in range(0, len(videos), chunk):
        part = videos[start:start + chunk]
        features = store.load_experts(part)
        check_finite_features(store, part, features, ", ".join(splits or sorted(known)))
        parts.append(run.encode_features(features))
        del features  # before the next chunk is read
    embeddings = torch.cat(parts)
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


def row_key(row: dict[str, Any]) -> str:
    """What identifies a video across indexes: its source file, else its id."""
    return str(row.get("path") or row["video_id"])


def same_embedder(old: Index, run: LoadedRun) -> bool:
    """Whether ``old`` was embedded by ``run``'s checkpoint (its rows can sit beside new ones)."""
    meta = index_meta(run, Path("."))
    return all(old.meta.get(k) == meta[k] for k in ("run", "checkpoint")) \
        and old.embeddings.shape[1] == run.model.cfg.embed_dim


def check_replace(old: Index | None, run: LoadedRun, new_keys: set[str], replace: bool,
                  gone: Collection[str] = ()) -> None:
    """Refuse (before any embedding) to drop videos of an existing index without ``--replace``: an
    index of the same checkpoint keeps its other videos (indexing adds), but one embedded by another
    run or checkpoint cannot, so writing over it would lose every video not indexed again now
    (``gone``: files that no longer exist, whose rows may go)."""
    if old is None or replace or same_embedder(old, run):
        return
    lost = [r for r in old.videos if row_key(r) not in new_keys and row_key(r) not in gone]
    if lost:
        by = old.meta.get("run", "another run")
        raise UserError(f"{old.folder} holds {len(old.videos)} videos embedded by {by}, "
                        f"{len(lost)} of which this index would drop ({lost[0]['path'] or lost[0]['video_id']}, ...); "
                        f"give --replace to replace it, or --out NAME for a separate index")


def merge(old: Index | None, new: Index, run: LoadedRun, replace: bool, folder: Path,
          rescanned: bool = False) -> tuple[Index, list[str]]:
    """``new`` plus the rows of ``old`` it does not hold again, when ``old`` has the same embedder and
    ``replace`` is off (indexing adds); else ``new`` alone. With ``rescanned``, ``new`` is everything
    now under ``folder``: earlier rows of files there that are gone or unreadable are not kept.
    Returns the index to save and the keys of the earlier rows it no longer holds."""
    if old is None:
        return new, []
    keys, root = {row_key(r) for r in new.videos}, folder.resolve()
    keep = [i for i, r in enumerate(old.videos) if row_key(r) not in keys
            and not (rescanned and r["path"] and Path(r["path"]).is_relative_to(root))] \
        if not replace and same_embedder(old, run) else []
    removed = [row_key(r) for i, r in enumerate(old.videos) if row_key(r) not in keys and i not in set(keep)]
    if not keep:
        return new, removed
    sources = sorted({*old.meta.get("sources", [old.meta.get("source", "")]), str(folder.resolve())} - {""})
    merged = Index(torch.cat([new.embeddings.float(), old.embeddings[keep].float()]),
                   new.videos + [old.videos[i] for i in keep], {**new.meta, "sources": sources},
                   thumbs=new.thumbs, thumbs_from=old.folder / "thumbs" if old.folder is not None else None)
    return merged, removed
