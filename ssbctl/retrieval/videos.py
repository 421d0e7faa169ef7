"""Embedding video files with a trained run: decode with each expert's sampling, run its backbone,
encode with the video encoder. Used by ``index --videos`` (incremental) and ``retrieve --video``."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from ssbctl.data.backbones import Backbone, build_backbone
from ssbctl.data.decode_pool import DecodePool
from ssbctl.data.video import VIDEO_SUFFIXES, Sampling
from ssbctl.engine.run import LoadedRun, read_expert_specs
from ssbctl.errors import UserError
from ssbctl.evaluation.evaluate import embed_features, require_finite
from ssbctl.io import atomic_write_text, jsonl_text, read_jsonl
from ssbctl.retrieval.index import Index

Progress = Callable[[int, int], None]
THUMB_SIZE = 96


def thumbnail_png(frame: np.ndarray, size: int = THUMB_SIZE) -> bytes:
    """A frame shrunk to fit ``size`` x ``size``, as PNG bytes."""
    from PIL import Image

    image = Image.fromarray(np.ascontiguousarray(frame))
    image.thumbnail((size, size))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def thumb_name(path: Path) -> str:
    """File name of a video's thumbnail inside an index folder."""
    return hashlib.sha1(str(path).encode()).hexdigest()[:16] + ".png"


def _backbone(spec: dict[str, Any], device: str) -> Backbone:
    options = {k: v for k, v in spec.items() if k not in ("name", "dim")}
    if spec["name"] == "imported":
        raise UserError("this run was trained on imported features: new videos need the same extractor")
    if spec["name"] != "pixels":
        options["device"] = device
    return build_backbone(spec["name"], **options)


class VideoEmbedder:
    """Everything between a video file and the run's embedding of it."""

    def __init__(self, run: LoadedRun, workers: int = 2) -> None:
        self.run, self.workers = run, workers
        specs = read_expert_specs(run.run_dir)
        self.backbones = [_backbone(s["backbone"], run.device.type) for s in specs]
        self.samplings = [Sampling(**s["sampling"]) for s in specs]
        self.decoders: dict[int, str] = {}  # set by features(): which decoder read each path (decord, pyav)

    def features(self, paths: list[Path], progress: Progress | None = None
                 ) -> Iterator[tuple[int, list[torch.Tensor] | None, str | None, bytes | None]]:
        """Per path: its features per expert (or None and the reason) and a thumbnail. Which
        decoder read each path lands in ``self.decoders`` (joined with ``+`` when experts differ)."""
        per_expert: list[dict[int, Any]] = []
        thumbs: dict[int, bytes] = {}
        used: dict[int, list[str]] = {}
        for e, (backbone, sampling) in enumerate(zip(self.backbones, self.samplings)):
            results: dict[int, Any] = {}
            for n, (key, decoded, reason) in enumerate(DecodePool(sampling, self.workers).map(enumerate(paths)), 1):
                if decoded is None:
                    results[key] = reason
                    continue
                frames = decoded.frames
                results[key] = backbone.encode(frames)
                used.setdefault(key, []).append(str(decoded.decoder))
                if e == 0:
                    thumbs[key] = thumbnail_png(frames[len(frames) // 2])
                if progress and e == len(self.backbones) - 1:
                    progress(n, len(paths))
            per_expert.append(results)
        self.decoders = {k: "+".join(dict.fromkeys(names)) for k, names in used.items()}
        for i in range(len(paths)):
            reasons = [r[i] for r in per_expert if isinstance(r[i], str)]
            if reasons:
                yield i, None, reasons[0], None
            else:
                yield i, [r[i] for r in per_expert], None, thumbs.get(i)

    def embed(self, features: list[list[torch.Tensor]]) -> torch.Tensor:
        """Normalised embeddings ``(N, D)`` of per-video expert features."""
        if not features:
            return torch.zeros(0, self.run.model.cfg.embed_dim)
        by_expert = [[f[e] for f in features] for e in range(len(self.backbones))]
        embedded = embed_features(self.run.model, by_expert, self.run.device)
        require_finite(f"run {self.run.run_dir} [{self.run.checkpoint.name}]", videos=embedded)
        return embedded


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
                 progress: Progress | None = None) -> dict[str, Any]:
    """Index every video under ``folder`` into ``out``; only new or changed files are embedded."""
    files = find_videos(folder)
    meta = {"run": str(Path(run.run_dir).resolve()), "checkpoint": run.checkpoint.name, "source": str(folder.resolve())}
    old = Index.load(out) if (out / "index.json").is_file() else None
    same_model = old is not None and all(old.meta.get(k) == meta[k] for k in ("run", "checkpoint")) \
        and old.embeddings.shape[1] == run.model.cfg.embed_dim
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
    Index(embeddings, rows, meta, thumbs=thumbs, thumbs_from=out / "thumbs").save(out, dtype)
    atomic_write_text(out / "failures.jsonl", jsonl_text(failures))
    return {"index": str(out), "videos": len(rows), "embedded": len(new_rows), "reused": len(keep),
            "failed": failures, "removed": len(known) - len(keep) - sum(1 for p in todo if str(p) in known)}


def embed_video_file(run: LoadedRun, path: Path) -> torch.Tensor:
    """The run's normalised embedding ``(1, D)`` of one video file."""
    embedder = VideoEmbedder(run, workers=0)
    (_, feats, reason, _), = list(embedder.features([Path(path)]))
    if feats is None:
        raise UserError(f"cannot read video {path}: {reason}")
    return embedder.embed([feats])


def failures_of(index_dir: Path) -> list[dict[str, Any]]:
    """The unreadable files an index skipped."""
    path = index_dir / "failures.jsonl"
    return list(read_jsonl(path)) if path.is_file() else []
