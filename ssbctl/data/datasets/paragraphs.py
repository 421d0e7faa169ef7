"""Paragraph-retrieval datasets: ActivityNet Captions and DiDeMo (as in CLIP4Clip).

Each video's sentences are joined into one paragraph, which is the video's only caption.
ActivityNet: ``train.json``, ``val_1.json`` (and ``val_2.json``), keyed by ``v_<id>`` with
``duration``, ``timestamps`` and ``sentences``; video files with or without the ``v_`` prefix.
DiDeMo: ``train_data.json``, ``val_data.json``, ``test_data.json``, lists of
``{"video", "description", ...}``; a video's descriptions joined in file order.

DiDeMo videos are cut as CLIP4Clip cuts them: its loader reads every video from second 0 to
second 31 (``start = 0``, ``end = 31``, one frame per whole second of ``range(start, end + 1)``),
so at most 32 frames at 1 fps, whatever the video's length. The reason (its comment, citing the
dataset's README): DiDeMo's moments are 5-second segments annotated within the first 30 s (videos
longer than that were cut to 30 s for annotation), so later footage is described by no
sentence. ``DIDEMO.max_seconds`` keeps the frames at most 31 s from the start, the same frames
at 1 fps up to the rounding of the frame rate (CLIP4Clip truncates it to an integer).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from ssbctl.core.errors import UserError
from ssbctl.data.datasets.common import Protocol, VideoFiles, VideoItem, find_file

ACTIVITYNET = Protocol(ks=(1, 5, 10, 50), paragraph=True, max_frames=64,
                       note="ActivityNet Captions paragraph-to-video on val_1; R@50 reported")
DIDEMO = Protocol(ks=(1, 5, 10, 50), paragraph=True, max_frames=64, max_seconds=31.0,
                  note="DiDeMo paragraph-to-video on test; R@50 reported; videos cut to their first 31 s "
                       "(the annotated 30 s, as CLIP4Clip)")


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno})") from None


def paragraph(sentences: list[str]) -> str:
    """Sentences joined with single spaces, each stripped."""
    return " ".join(s.strip() for s in sentences if s and s.strip())


def read_activitynet(root: Path) -> list[VideoItem]:
    """Train and val_1 (val_2 too when present) with one paragraph per video."""
    files = VideoFiles(root)
    items = []
    for split in ("train", "val_1", "val_2"):
        path = find_file(root, f"{split}.json", required=split in ("train", "val_1"))
        if path is None:
            continue
        data = _json(path)
        if not isinstance(data, dict):
            raise UserError(f"{path}: expected an object keyed by video id")
        for vid, entry in data.items():
            bare = vid[2:] if vid.startswith("v_") else vid
            items.append(VideoItem(vid, files.find(vid, bare), split, [paragraph(entry.get("sentences", []))]))
    return items


def read_didemo(root: Path) -> list[VideoItem]:
    """Train, val and test with one paragraph per video."""
    files = VideoFiles(root)
    items = []
    for split in ("train", "val", "test"):
        path = find_file(root, f"{split}_data.json", required=split != "val")
        if path is None:
            continue
        sentences: dict[str, list[str]] = defaultdict(list)
        for entry in _json(path):
            sentences[entry["video"]].append(entry["description"])
        for vid, sents in sentences.items():
            items.append(VideoItem(vid, files.find(vid, Path(vid).stem), split, [paragraph(sents)]))
    return items
