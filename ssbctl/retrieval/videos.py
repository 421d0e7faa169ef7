"""Indexing a folder of video files with a trained run (``index --videos``), incrementally: only new
or changed files are embedded, through the run's one video path (:class:`VideoEmbedder`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ssbctl.core.errors import UserError
from ssbctl.core.io import atomic_write_text, jsonl_text
from ssbctl.data.video import VIDEO_SUFFIXES
from ssbctl.inference.run import LoadedRun, Progress, VideoEmbedder
from ssbctl.retrieval.build import check_replace, merge, row_key, same_embedder
from ssbctl.retrieval.index import Index, index_meta, thumb_name


def find_videos(folder: Path) -> list[Path]:
    """Every video file under ``folder`` (recursively), sorted."""
    if not folder.is_dir():
        raise UserError(f"--videos {folder} is not a folder")
    root = folder.resolve()
    found = []
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() not in VIDEO_SUFFIXES or not path.is_file():
            continue
        _check_name(path)
        resolved = path.resolve()
        _check_name(resolved)
        if not resolved.is_relative_to(root):
            raise UserError(f"--videos: {path} links to {resolved}, outside {folder}; copy the file in, "
                            f"or index the folder it is in")
        found.append(resolved)
    return sorted(found)


def _check_name(path: Path) -> None:
    """Index files are UTF-8: a file name in another encoding is refused before any work."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(path).decode("utf-8", "backslashreplace")
        raise UserError(f"--videos: the file name {shown} is not UTF-8; rename the file") from None


def index_videos(run: LoadedRun, folder: Path, out: Path, dtype: torch.dtype = torch.float32, workers: int = 2,
                 progress: Progress | None = None, replace: bool = False) -> dict[str, Any]:
    """Index every video under ``folder`` into ``out``; only new or changed files are embedded.

    An index already in ``out`` embedded by the same checkpoint keeps the videos of its other
    folders (indexing adds); one of another run is replaced only with ``replace`` (else UserError,
    before any work), unless every video it holds is indexed again."""
    files = find_videos(folder)
    if not files:  # an empty index would answer every query with nothing, silently
        raise UserError(f"--videos {folder}: no video files ({', '.join(sorted(VIDEO_SUFFIXES))}) in it")
    meta = index_meta(run, folder)
    old = Index.load(out) if (out / "index.json").is_file() else None
    same_model = old is not None and same_embedder(old, run)
    root = folder.resolve()
    gone = {row_key(r) for r in old.videos if r["path"] and Path(r["path"]).is_relative_to(root)
            and not Path(r["path"]).is_file()} if old is not None else set()
    check_replace(old, run, {str(p) for p in files}, replace, gone)
    known = {v["path"]: (i, v) for i, v in enumerate(old.videos)} if old is not None and same_model else {}
    keep, todo = [], []
    for path in files:
        stat = path.stat()
        hit = known.get(str(path))
        if hit and hit[1].get("size") == stat.st_size and hit[1].get("mtime_ns") == stat.st_mtime_ns:
            keep.append(hit[0])
        else:
            todo.append(path)
    embedder = VideoEmbedder(run, workers) if todo else None  # loading backbones only when there is work
    new_feats, new_rows, thumbs, failures = [], [], {}, []
    for i, feats, reason, thumb in embedder.features(todo, progress) if embedder else []:
        path = todo[i]
        if feats is None:
            failures.append({"path": str(path), "reason": reason})
            continue
        stat = path.stat()
        new_feats.append(feats)
        new_rows.append({"video_id": str(path.relative_to(folder.resolve()).with_suffix("")), "path": str(path),
                         "split": "", "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "thumb": thumb_name(path),
                         "decoder": embedder.decoders[i] if embedder else ""})
        if thumb is not None:  # always, for a video whose features were read
            thumbs[thumb_name(path)] = thumb
    parts = [old.embeddings[keep].float()] if keep and old is not None else []
    if embedder is not None and new_feats:
        parts.append(embedder.embed(new_feats))
    embeddings = torch.cat(parts) if parts else torch.zeros(0, run.model.cfg.embed_dim)
    rows = [old.videos[i] for i in keep] + new_rows if old is not None else new_rows
    built, removed = merge(old, Index(embeddings, rows, meta, thumbs=thumbs, thumbs_from=out / "thumbs"), run,
                           replace, folder, rescanned=True)
    built.save(out, dtype)
    atomic_write_text(out / "failures.jsonl", jsonl_text(failures))
    return {"index": str(out), "videos": len(built.videos), "embedded": len(new_rows), "reused": len(keep),
            "kept": len(built.videos) - len(rows), "failed": failures, "removed": len(removed),
            "removed_videos": removed}
