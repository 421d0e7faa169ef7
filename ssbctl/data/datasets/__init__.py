"""Datasets by name: each reads files on disk into videos with captions, splits and a protocol."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ssbctl.core.errors import UserError
from ssbctl.data.datasets import msrvtt, msvd, paragraphs, vatex
from ssbctl.data.datasets.common import Protocol, VideoItem, require_root
from ssbctl.data.datasets.custom import read_custom


@dataclass(frozen=True)
class DatasetOptions:
    """What a reader may need besides the root folder."""

    root: Path | None = None
    annotations: Path | None = None  # custom: the annotation file
    variant: str = "9k"  # msrvtt: 9k or 7k training split


@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset."""

    read: Callable[[DatasetOptions], list[VideoItem]]
    protocol: Protocol
    layout: str = ""  # what a user puts in the dataset folder, in words (said when it is missing)


def _custom(opts: DatasetOptions) -> list[VideoItem]:
    annotations = opts.annotations
    if annotations is None and opts.root is not None:
        found = [p for p in (opts.root / "annotations.jsonl", opts.root / "annotations.csv") if p.is_file()]
        annotations = found[0] if found else None
    if annotations is None:
        raise UserError("custom needs --annotations FILE (or --root with annotations.jsonl/.csv)")
    return read_custom(annotations)


DATASETS: dict[str, DatasetSpec] = {
    "msrvtt": DatasetSpec(lambda o: msrvtt.read_msrvtt(require_root(o.root, "msrvtt"), o.variant), msrvtt.PROTOCOL,
                          "MSRVTT_data.json and the videos (videoN.mp4, e.g. in videos/all/)"),
    "msvd": DatasetSpec(lambda o: msvd.read_msvd(require_root(o.root, "msvd")), msvd.PROTOCOL,
                        "YouTubeClips/ID.avi and raw-captions.pkl or AllVideoDescriptions.txt"),
    "vatex": DatasetSpec(lambda o: vatex.read_vatex(require_root(o.root, "vatex")), vatex.PROTOCOL,
                         "vatex_training_v1.0.json, vatex_validation_v1.0.json and the clips (videoID.mp4)"),
    "activitynet": DatasetSpec(lambda o: paragraphs.read_activitynet(require_root(o.root, "activitynet")),
                               paragraphs.ACTIVITYNET, "train.json, val_1.json (ActivityNet Captions) and the "
                               "videos (v_ID.mp4; distributed on request)"),
    "didemo": DatasetSpec(lambda o: paragraphs.read_didemo(require_root(o.root, "didemo")), paragraphs.DIDEMO,
                          "train_data.json, val_data.json, test_data.json and the videos (from YFCC100M)"),
    "custom": DatasetSpec(_custom, Protocol(max_frames=12, note="custom: every caption a query")),
    # shapes is generated, then read like custom (see ssbctl.data.prepare.dataset_items)
    "shapes": DatasetSpec(_custom, Protocol(max_frames=8, note="shapes: every caption a query")),
}


def dataset_spec(name: str) -> DatasetSpec:
    """A registered dataset by name."""
    if name not in DATASETS:
        raise UserError(f"unknown dataset '{name}'; known: {', '.join(DATASETS)}")
    return DATASETS[name]


__all__ = ["DATASETS", "DatasetOptions", "DatasetSpec", "Protocol", "VideoItem", "dataset_spec", "read_custom"]
