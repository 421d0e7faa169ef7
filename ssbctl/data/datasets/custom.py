"""``custom``: a user's own videos with a JSON Lines or CSV file of (video, caption[, split]).

One row per caption; ``video`` is a path relative to the annotation file's folder (or absolute).
Rows without a split go to the split ``all``. The video id is the file name without its suffix.
"""

from __future__ import annotations

import json
from pathlib import Path

from ssbctl.core.errors import UserError
from ssbctl.data.datasets.common import VideoItem, read_csv


def _rows(path: Path) -> list[dict[str, object]]:
    try:
        if path.suffix == ".csv":
            return [dict(row) for row in read_csv(path)]
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{n}: invalid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{n}: expected a JSON object with 'video' and 'caption', "
                                f"got {type(row).__name__}")
            rows.append(row)
    return rows


def _text(annotations: Path, n: int, row: dict[str, object], key: str, required: bool = True) -> str:
    """A string field of row ``n``: present (if required), a string, and not blank."""
    value = row.get(key)
    if not required and (value is None or isinstance(value, str) and not value.strip()):
        return ""
    if value is None or value == "":
        raise UserError(f"{annotations}: row {n} needs 'video' and 'caption'")
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{annotations}: row {n}: '{key}' must be non-empty text, got {value!r:.60}")
    return value.strip()


def read_custom(annotations: Path) -> list[VideoItem]:
    """Videos and their captions from an annotation file, grouped by video in file order."""
    annotations = Path(annotations)
    if not annotations.is_file():
        raise UserError(f"annotation file not found: {annotations}")
    items: dict[Path, VideoItem] = {}
    for n, row in enumerate(_rows(annotations), 1):
        video, caption = _text(annotations, n, row, "video"), _text(annotations, n, row, "caption")
        path = (annotations.parent / video).resolve()
        split = _text(annotations, n, row, "split", required=False) or "all"
        item = items.setdefault(path, VideoItem(path.stem, path, split))
        if item.split != split:
            raise UserError(f"{annotations}: row {n}: video {video} is in splits {item.split} and {split}")
        item.captions.append(caption)
    if not items:  # 0 bytes, blank lines, a CSV header alone: nothing to prepare
        raise UserError(f"{annotations}: no annotation rows (expected video, caption[, split] per row)")
    ids = [i.video_id for i in items.values()]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise UserError(f"{annotations}: two videos are named '{dup}'; video file names must be unique")
    return list(items.values())
