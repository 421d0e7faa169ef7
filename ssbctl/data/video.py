"""Decoding videos with decord and choosing which frames to keep."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v")


class DecodeError(Exception):
    """A video could not be read; the message is the reason recorded in failures.jsonl."""


@dataclass(frozen=True)
class Sampling:
    """Which frames of a video become features.

    ``uniform``: ``num_frames`` frames at the centres of equal segments (CLIP4Clip-style).
    ``fps``: one frame every ``1/fps`` seconds, thinned uniformly to at most ``num_frames``.
    """

    mode: str = "uniform"
    num_frames: int = 8
    fps: float = 1.0

    def indices(self, total: int, native_fps: float) -> list[int]:
        """Frame indices to decode from a video of ``total`` frames at ``native_fps``."""
        if total <= 0:
            return []
        if self.mode == "uniform":
            count = self.num_frames
        elif self.mode == "fps":
            step = max(native_fps, 1e-6) / self.fps
            picked = np.arange(0, total, step)
            if len(picked) <= self.num_frames:
                return [int(i) for i in picked]
            count = self.num_frames
        else:
            raise ValueError(f"unknown sampling mode {self.mode!r}")
        edges = (np.arange(count) + 0.5) * total / count
        return [int(i) for i in np.minimum(edges.astype(np.int64), total - 1)]


def read_frames(path: Path, sampling: Sampling) -> np.ndarray:
    """Decode the sampled frames of ``path`` as uint8 ``(T, H, W, 3)``; raise DecodeError."""
    import decord

    path = Path(path)
    if not path.is_file():
        raise DecodeError("missing file")
    if path.stat().st_size == 0:
        raise DecodeError("empty file")
    try:
        reader = decord.VideoReader(str(path), num_threads=1)
        total = len(reader)
        if total == 0:
            raise DecodeError("no video frames")
        frames = reader.get_batch(sampling.indices(total, reader.get_avg_fps())).asnumpy()
    except (RuntimeError, decord.DECORDError) as exc:
        raise DecodeError(f"decode error: {str(exc).strip().splitlines()[0][:200]}") from None
    if frames.ndim != 4 or frames.shape[0] == 0:
        raise DecodeError(f"unexpected frame array of shape {frames.shape}")
    return frames
