"""MSR-VTT as its publishers (and the CLIP4Clip release) ship it.

Files: ``MSRVTT_data.json`` (``videos`` and ``sentences``), ``MSRVTT_train.9k.csv`` or
``MSRVTT_train.7k.csv`` (column ``video_id``), ``MSRVTT_JSFUSION_test.csv`` (the 1k-A test:
``key, vid_key, video_id, sentence``) and the videos (``video0.mp4`` ... anywhere under the root).
Protocol 1k-A: train on every caption of the 9k (or 7k) videos; test on the 1,000 JSFUSION pairs,
one caption per video, a 1,000 x 1,000 retrieval.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from ssbctl.core.errors import UserError
from ssbctl.data.datasets.common import Protocol, VideoFiles, VideoItem, find_file, read_csv, split_file

PROTOCOL = Protocol(ks=(1, 5, 10), max_frames=12,
                    note="MSR-VTT 1k-A: 1,000 JSFUSION test pairs, one caption per video")
TRAIN_FILES = {"9k": "MSRVTT_train.9k.csv", "7k": "MSRVTT_train.7k.csv"}


def read_test_pairs(path: Path) -> list[tuple[str, str]]:
    """(video_id, sentence) of the JSFUSION 1k-A test file."""
    rows = read_csv(path)
    if not rows or not {"video_id", "sentence"} <= rows[0].keys():
        raise UserError(f"{path}: expected columns video_id and sentence")
    return [(r["video_id"], r["sentence"].strip()) for r in rows]


def read_msrvtt(root: Path, variant: str = "9k") -> list[VideoItem]:
    """Train items (all captions) and the 1k-A test items (one caption each)."""
    if variant not in TRAIN_FILES:
        raise UserError(f"MSR-VTT split must be one of {', '.join(TRAIN_FILES)}, got {variant!r}")
    data_file = find_file(root, "MSRVTT_data.json")
    try:
        data = json.loads(data_file.read_text(encoding="utf-8"))
        sentences = data["sentences"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise UserError(f"{data_file}: not an MSR-VTT annotation file ({exc})") from None
    captions: dict[str, list[str]] = defaultdict(list)
    for s in sentences:
        captions[s["video_id"]].append(s["caption"].strip())
    train_file = split_file(root, "msrvtt", TRAIN_FILES[variant])
    if not train_file.is_file():
        raise UserError(f"{TRAIN_FILES[variant]} not found under {root} (ssbctl ships only the 9k list)")
    files = VideoFiles(root)
    items = [VideoItem(r["video_id"], files.find(r["video_id"]), "train", captions[r["video_id"]])
             for r in read_csv(train_file)]
    test = read_test_pairs(split_file(root, "msrvtt", "MSRVTT_JSFUSION_test.csv"))
    items += [VideoItem(vid, files.find(vid), "test", [sentence]) for vid, sentence in test]
    return items
