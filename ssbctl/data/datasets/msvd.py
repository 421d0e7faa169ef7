"""MSVD (YouTube2Text) as the CLIP4Clip release ships it.

Captions from ``raw-captions.pkl`` (a dict of video id to token lists, read with an unpickler
that refuses anything but plain containers and strings) or ``AllVideoDescriptions.txt``;
splits from ``train_list.txt`` / ``val_list.txt`` / ``test_list.txt`` (1,200 / 100 / 670; shipped);
videos ``YouTubeClips/<id>.avi``, or ``vidN`` files through ``youtube_mapping.txt``.
Protocol: every test caption is its own query against the 670 test videos.
"""

from __future__ import annotations

import io
import pickle
from collections import defaultdict
from pathlib import Path
from typing import Any

from ssbctl.core.errors import UserError
from ssbctl.data.datasets.common import Protocol, VideoFiles, VideoItem, find_file, read_ids, split_file

PROTOCOL = Protocol(ks=(1, 5, 10), max_frames=12,
                    note="MSVD: 670 test videos, every caption a query; v2t counts the best caption")
SPLITS = {"train": "train_list.txt", "val": "val_list.txt", "test": "test_list.txt"}


class _PlainUnpickler(pickle.Unpickler):
    """Builds dicts, lists, tuples, strings and numbers; refuses every class or function."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def load_plain_pickle(path: Path) -> Any:
    """Unpickle a file that may only hold plain data; anything that would run code is refused."""
    try:
        return _PlainUnpickler(io.BytesIO(Path(path).read_bytes())).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
        raise UserError(f"{path}: refused or unreadable pickle ({exc})") from None


def read_raw_captions(path: Path) -> dict[str, list[str]]:
    """``raw-captions.pkl``: video id -> list of captions (each a token list or a string)."""
    data = load_plain_pickle(path)
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a dict of video id to captions")
    out: dict[str, list[str]] = {}
    for vid, caps in data.items():
        if not isinstance(vid, str) or not isinstance(caps, (list, tuple)):
            raise UserError(f"{path}: entry {vid!r} is not a list of captions")
        out[vid] = [" ".join(c) if isinstance(c, (list, tuple)) else str(c) for c in caps]
    return out


def read_descriptions(path: Path) -> dict[str, list[str]]:
    """``AllVideoDescriptions.txt``: ``<id> <caption>`` per line, ``#`` comments."""
    out: dict[str, list[str]] = defaultdict(list)
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.strip() and not line.startswith("#") and " " in line:
            vid, caption = line.split(" ", 1)
            out[vid].append(caption.strip())
    return out


def read_mapping(path: Path | None) -> dict[str, str]:
    """``youtube_mapping.txt``: ``<youtube id> vidN`` per line."""
    if path is None:
        return {}
    pairs = (line.split() for line in path.read_text().splitlines() if line.strip())
    return {p[0]: p[1] for p in pairs if len(p) == 2}


def read_msvd(root: Path) -> list[VideoItem]:
    """Items of the three standard splits."""
    pkl = find_file(root, "raw-captions.pkl", required=False)
    if pkl is not None:
        captions = read_raw_captions(pkl)
    else:
        captions = read_descriptions(find_file(root, "raw-captions.pkl", "AllVideoDescriptions.txt"))
    mapping = read_mapping(find_file(root, "youtube_mapping.txt", required=False))
    files = VideoFiles(root)
    items = []
    for split, name in SPLITS.items():
        for vid in read_ids(split_file(root, "msvd", name)):
            alternatives = [vid] + ([mapping[vid]] if vid in mapping else [])
            items.append(VideoItem(vid, files.find(*alternatives), split, captions.get(vid, [])))
    return items
