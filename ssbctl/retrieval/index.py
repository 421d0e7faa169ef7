"""An index folder of video embeddings, and exact top-k search over it in bounded memory.

Layout: ``index.json`` (format, run, checkpoint, dim, count, dtype), ``embeddings.safetensors``
(``embeddings``: ``(N, D)`` L2-normalised) and ``videos.jsonl`` (video_id, path, split).
"""

from __future__ import annotations

import hashlib
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ssbctl.core.errors import DataError, UserError
from ssbctl.core.io import (
    atomic_write_json,
    atomic_write_text,
    check_output,
    fresh_dir,
    jsonl_text,
    output_path,
    read_jsonl,
    replace_dir,
    save_tensors,
)
from ssbctl.core.validate import check_rows, load_tensors, read_json
from ssbctl.core.validate import field as require

if TYPE_CHECKING:
    from ssbctl.inference.run import LoadedRun

FORMAT_VERSION = 1
VIDEO_FIELDS = {"video_id": str, "path": str}


@dataclass
class Index:
    """Embeddings of a set of videos plus where each came from."""

    embeddings: torch.Tensor  # (N, D)
    videos: list[dict[str, Any]]  # video_id, path, split[, size, mtime_ns, thumb, decoder]
    meta: dict[str, Any] = field(default_factory=dict)  # run, checkpoint, ...
    thumbs: dict[str, bytes] = field(default_factory=dict)  # new thumbnails (PNG) by file name
    thumbs_from: Path | None = None  # folder holding the thumbnails of earlier rows
    folder: Path | None = None  # where the index was loaded from
    backend: str = "exact"  # exact (chunked scan) or faiss (the folder's approximate index)
    _screen_cache: dict[str, object] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.embeddings.shape[0] != len(self.videos):
            raise ValueError("one video record per embedding row is required")

    def __repr__(self) -> str:
        where = f", folder={str(self.folder)!r}" if self.folder is not None else ""
        return f"Index({len(self.videos)} videos, dim={int(self.embeddings.shape[1])}{where}, backend={self.backend!r})"

    def search(self, queries: torch.Tensor, k: int = 5) -> list[Any]:
        """Top-``k`` videos for each normalised query ``(Q, D)``: per query a list of hits (rank,
        video_id, score, path; fewer than ``k`` when an approximate index finds fewer). One 1-D
        query ``(D,)`` gives its list of hits directly. A score that is not finite is None (valid JSON)."""
        if queries.ndim == 1:
            return self.search(queries.unsqueeze(0), k)[0]
        scores, rows = self.top(queries, k)
        return [[{"rank": r + 1, "video_id": self.videos[i]["video_id"], "score": s if math.isfinite(s) else None,
                  "path": self.videos[i]["path"]}
                 for r, (s, i) in enumerate((s, i) for s, i in zip(srow.tolist(), irow.tolist()) if i >= 0)]
                for srow, irow in zip(scores, rows)]

    def top(self, queries: torch.Tensor, k: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Scores and rows of the best ``k`` videos of each query, best first: one 1-D tensor per query.

        Exact search always gives ``min(k, N)``. The faiss backend gives fewer when the cells it
        probes hold fewer than ``k`` videos: faiss fills those slots with row -1, which are dropped
        here (indexing with -1 would silently name the last video)."""
        if self.backend == "faiss" and self.folder is not None:
            from ssbctl.retrieval.ann import ann_search

            scores, rows = ann_search(self.folder, queries, min(k, len(self.videos)))
            found = [r >= 0 for r in rows]
            return [s[f] for s, f in zip(scores, found)], [r[f] for r, f in zip(rows, found)]
        from ssbctl.retrieval.exact import exact_topk

        scores, rows = exact_topk(queries, self.embeddings, k, self._screen_cache)
        return list(scores.unbind(0)), list(rows.unbind(0))

    def save(self, folder: Path, dtype: torch.dtype = torch.float32) -> None:
        """Write the index folder whole (temp folder, then rename); it replaces only an earlier index."""
        folder = output_path(folder)
        check_output(folder, "index")
        tmp = fresh_dir(folder.parent / f".{folder.name}.tmp")
        save_tensors(tmp / "embeddings.safetensors", {"embeddings": self.embeddings.to(dtype).contiguous()})
        self._save_thumbs(tmp / "thumbs")
        atomic_write_text(tmp / "videos.jsonl", jsonl_text(self.videos))
        atomic_write_json(tmp / "index.json", {"format_version": FORMAT_VERSION, "count": len(self.videos),
                                               "dim": int(self.embeddings.shape[1]),
                                               "dtype": str(dtype).removeprefix("torch."), **self.meta})
        replace_dir(tmp, folder, kind="index")

    def _save_thumbs(self, target: Path) -> None:
        target.mkdir()
        for row in self.videos:
            name = row.get("thumb")
            if not name:
                continue
            if name in self.thumbs:
                (target / name).write_bytes(self.thumbs[name])
            elif self.thumbs_from is not None and (self.thumbs_from / name).is_file():
                shutil.copyfile(self.thumbs_from / name, target / name)

    def thumbnail(self, row: int) -> Path | None:
        """The thumbnail file of a row, when the index has one."""
        name = self.videos[row].get("thumb")
        path = self.folder / "thumbs" / Path(name).name if self.folder is not None and name else None
        return path if path is not None and path.is_file() else None

    @classmethod
    def load(cls, folder: Path) -> Index:
        """Read an index folder (``~`` is the user's home)."""
        folder = Path(folder).expanduser()
        if not (folder / "index.json").is_file():
            raise UserError(f"no index at {folder}; build one with `ssbctl index` or run `ssbctl demo`")
        meta = read_json(folder / "index.json")
        if meta.get("format_version") != FORMAT_VERSION:
            raise UserError(f"{folder}: index format {meta.get('format_version')} is not {FORMAT_VERSION}")
        for key in ("run", "checkpoint"):  # optional for a library-built index; Searcher needs "run"
            if key in meta:
                require(meta, key, str, str(folder / "index.json"))
        embeddings = load_tensors(folder / "embeddings.safetensors").get("embeddings")
        if embeddings is None or embeddings.ndim != 2 or not embeddings.is_floating_point():
            raise DataError(f"{folder / 'embeddings.safetensors'}: expected an (N, D) float tensor 'embeddings'")
        videos = check_rows(list(read_jsonl(folder / "videos.jsonl")), folder / "videos.jsonl", VIDEO_FIELDS)
        for n, row in enumerate(videos, 1):
            if "thumb" in row:
                require(row, "thumb", str, f"{folder / 'videos.jsonl'} row {n}")
        if embeddings.shape[0] != len(videos):
            raise DataError(f"{folder}: {embeddings.shape[0]} embeddings but {len(videos)} rows in videos.jsonl; "
                            f"rebuild the index")
        return cls(embeddings, videos, meta, folder=folder)


def thumb_name(path: Path) -> str:
    """File name of a video's thumbnail inside an index folder."""
    return hashlib.sha1(str(path).encode()).hexdigest()[:16] + ".png"


def index_meta(run: LoadedRun, source: Path) -> dict[str, str]:
    """What ``index.json`` records of an index's origin: the run and checkpoint that embedded it
    (a searcher loads them to embed queries; an update reuses rows only from the same ones) and
    the folder the videos came from."""
    return {"run": str(Path(run.run_dir).resolve()), "checkpoint": run.checkpoint.name,
            "source": str(Path(source).resolve())}
