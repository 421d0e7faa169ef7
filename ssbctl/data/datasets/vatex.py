"""VATEX with the HGR split (25,991 / 1,500 / 1,500), English captions.

Files: ``vatex_training_v1.0.json`` and ``vatex_validation_v1.0.json`` (lists of
``{videoID, enCap, chCap}``) and the HGR split lists ``train_list.txt``, ``val_list.txt``,
``test_list.txt`` (one videoID per line; the HGR val and test both come from the official
validation set, so the lists are required). Videos named by videoID.
Protocol: every test caption (10 per video) is its own query.
"""

from __future__ import annotations

import json
from pathlib import Path

from ssbctl.core.errors import UserError
from ssbctl.data.datasets.common import Protocol, VideoFiles, VideoItem, find_file, read_ids

PROTOCOL = Protocol(ks=(1, 5, 10), max_frames=12,
                    note="VATEX HGR split: 1,500 test videos, 10 captions each, every caption a query")


def read_vatex(root: Path) -> list[VideoItem]:
    """Items of the HGR train, val and test lists."""
    captions: dict[str, list[str]] = {}
    for name in ("vatex_training_v1.0.json", "vatex_validation_v1.0.json"):
        path = find_file(root, name, required=False)
        if path is None:
            continue
        for entry in json.loads(path.read_text(encoding="utf-8")):
            captions[entry["videoID"]] = [c.strip() for c in entry["enCap"]]
    if not captions:
        raise UserError(f"no vatex_training_v1.0.json or vatex_validation_v1.0.json under {root}")
    files = VideoFiles(root)
    items = []
    for split in ("train", "val", "test"):
        lists = find_file(root, f"{split}_list.txt", required=False)
        if lists is None:
            raise UserError(f"VATEX needs the HGR split list {split}_list.txt under {root}")
        items += [VideoItem(v, files.find(v), split, captions.get(v, [])) for v in read_ids(lists)]
    return items
