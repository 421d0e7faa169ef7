"""Decode videos, run a frozen backbone over the sampled frames and write a feature store."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from ssbctl.data.backbones import Backbone
from ssbctl.data.datasets import DATASETS, VideoItem, read_custom
from ssbctl.data.datasets.shapes import ShapesSpec, generate
from ssbctl.data.store import StoreWriter
from ssbctl.data.video import DecodeError, Sampling, read_frames
from ssbctl.errors import UserError
from ssbctl.paths import home

Progress = Callable[[int, int], None]


def prepare_items(items: list[VideoItem], out: Path, dataset: str, backbone: Backbone,
                  sampling: Sampling, progress: Progress | None = None) -> dict[str, Any]:
    """Prepare every item into the store at ``out``; unusable videos are recorded, not fatal.

    Returns the manifest with an extra ``failed`` list (the rows of failures.jsonl)."""
    writer = StoreWriter(out, dataset, backbone, sampling)
    for n, item in enumerate(items, 1):
        try:
            features = backbone.encode(read_frames(item.path, sampling))
            if not torch.isfinite(features).all():
                raise DecodeError("non-finite features")
        except DecodeError as exc:
            writer.fail(item.video_id, str(item.path), str(exc))
        else:
            writer.add(item.video_id, item.split, str(item.path), features, item.captions)
        if progress:
            progress(n, len(items))
    manifest = writer.commit()
    manifest["failed"] = writer.failures
    return manifest


def dataset_items(dataset: str, root: Path | None, annotations: Path | None,
                  shapes: ShapesSpec | None = None, progress: Progress | None = None) -> list[VideoItem]:
    """The videos of a named dataset (generating ``shapes`` first when needed)."""
    if dataset == "shapes":
        root = root or home() / "raw" / "shapes"
        return read_custom(generate(root, shapes or ShapesSpec(), progress))
    if dataset == "custom":
        if annotations is None:
            found = [p for p in (root / "annotations.jsonl", root / "annotations.csv") if p.is_file()] if root else []
            if not found:
                raise UserError("custom needs --annotations FILE (or --root with annotations.jsonl/.csv)")
            annotations = found[0]
        return read_custom(annotations)
    raise UserError(f"unknown dataset '{dataset}'; known: {', '.join(DATASETS)}")
