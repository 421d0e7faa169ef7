"""``custom``: a user's own videos with a JSON Lines or CSV file of (video, caption[, split]).

One row per caption; ``video`` is a path relative to the annotation file's folder (or absolute).
Rows without a split go to the split ``all``. The video id is the file name without its suffix.
"""

from __future__ import annotations

import json
from pathlib import Path

from ssbctl.data.datasets.common import VideoItem, read_csv
from ssbctl.errors import UserError


def _rows(path: Path) -> list[dict[str, str]]:
    if path.suffix == ".csv":
        return read_csv(path)
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{n}: invalid JSON ({exc.msg})") from None
    return rows


def read_custom(annotations: Path) -> list[VideoItem]:
    """Videos and their captions from an annotation file, grouped by video in file order."""
    annotations = Path(annotations)
    if not annotations.is_file():
        raise UserError(f"annotation file not found: {annotations}")
    items: dict[Path, VideoItem] = {}
    for n, row in enumerate(_rows(annotations), 1):
        if not row.get("video") or not row.get("caption"):
            raise UserError(f"{annotations}: row {n} needs 'video' and 'caption'")
        path = (annotations.parent / row["video"]).resolve()
        split = row.get("split") or "all"
        item = items.setdefault(path, VideoItem(path.stem, path, split))
        if item.split != split:
            raise UserError(f"{annotations}: row {n}: video {row['video']} is in splits {item.split} and {split}")
        item.captions.append(str(row["caption"]).strip())
    ids = [i.video_id for i in items.values()]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise UserError(f"{annotations}: two videos are named '{dup}'; video file names must be unique")
    return list(items.values())
