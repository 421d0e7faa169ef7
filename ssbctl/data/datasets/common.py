"""What the dataset readers share: the video item, finding video files, shipped split lists."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal, overload

from ssbctl.core.errors import UserError
from ssbctl.data.video import VIDEO_SUFFIXES


@dataclass
class VideoItem:
    """One video to prepare and the captions that describe it."""

    video_id: str
    path: Path
    split: str
    captions: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Protocol:
    """How a dataset is evaluated and sampled by default."""

    ks: tuple[int, ...] = (1, 5, 10)  # recall cut-offs reported
    paragraph: bool = False  # captions of a video joined into one paragraph query
    max_frames: int = 12  # frames at 1 fps up to this many
    max_seconds: float | None = None  # only the frames at most this many seconds from the start (DiDeMo)
    note: str = ""  # the protocol in words (printed by prepare, kept in the manifest)


class VideoFiles:
    """Every video file under a root, found by file name without its suffix."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.by_stem: dict[str, Path] = {}
        for path in sorted(self.root.rglob("*")):
            if path.suffix.lower() in VIDEO_SUFFIXES and path.is_file():
                self.by_stem.setdefault(path.stem, path)

    def find(self, *names: str) -> Path:
        """The first of ``names`` that has a file; else a path that does not exist (recorded as missing)."""
        for name in names:
            if name in self.by_stem:
                return self.by_stem[name]
        return self.root / f"{names[0]}.mp4"


@overload
def find_file(root: Path, *names: str, required: Literal[True] = True) -> Path: ...
@overload
def find_file(root: Path, *names: str, required: bool) -> Path | None: ...


def find_file(root: Path, *names: str, required: bool = True) -> Path | None:
    """The first file under ``root`` (searched recursively) with one of ``names``."""
    for name in names:
        direct = Path(root) / name
        if direct.is_file():
            return direct
        found = sorted(Path(root).rglob(name))
        if found:
            return found[0]
    if required:
        raise UserError(f"{' or '.join(names)} not found under {root}")
    return None


def shipped_split(dataset: str, name: str) -> Path:
    """A split file that ships with ssbctl (from the dataset's own release)."""
    return Path(str(resources.files("ssbctl") / "data" / "splits" / dataset / name))


def split_file(root: Path, dataset: str, name: str) -> Path:
    """The split file from the dataset folder if it has one, else the copy that ships with ssbctl."""
    return find_file(root, name, required=False) or shipped_split(dataset, name)


def read_ids(path: Path) -> list[str]:
    """One id per line, blank lines skipped."""
    return [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def read_csv(path: Path) -> list[dict[str, str]]:
    """Rows of a CSV file with a header."""
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def require_root(root: Path | None, dataset: str) -> Path:
    """The dataset folder, which must exist."""
    if root is None:
        raise UserError(f"{dataset} needs --root FOLDER (the dataset as its publishers ship it)")
    if not Path(root).is_dir():
        raise UserError(f"--root {root} is not a folder")
    return Path(root)
