"""Decoding videos and choosing which frames to keep.

decord decodes first (it seeks straight to the sampled frames). It fails on some valid files
(decord 0.6.0 rejects frames of some widths, such as 16, 24, 48 or 72 pixels, with
``Check failed: from_size == to_size``) and trusts the container's frame count, so when it raises
or returns frames of the wrong count or layout the file is decoded again with PyAV (FFmpeg):
sequentially, picking the same frame indices, counted by decoding rather than from the header.
Both give RGB ``uint8`` ``(T, H, W, 3)``; :class:`Decoded` says which one produced the frames.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v")
DECODERS = ("decord", "pyav")  # tried in this order
THUMB_SIZE = 96


class DecodeError(Exception):
    """A video could not be read; the message is the reason recorded in failures.jsonl.
    ``tried`` names the decoders that ran and failed."""

    def __init__(self, reason: str, tried: tuple[str, ...] = ()) -> None:
        super().__init__(reason)
        self.tried = tried


@dataclass(frozen=True)
class Sampling:
    """Which frames of a video become features.

    ``uniform``: ``num_frames`` frames at the centres of equal segments (CLIP4Clip-style).
    ``fps``: one frame every ``1/fps`` seconds, thinned uniformly to at most ``num_frames``.
    ``max_seconds``: either mode sees only the frames at most this many seconds from the start
    (a dataset protocol's window, e.g. DiDeMo's; ignored when the frame rate is unknown).
    ``short_side``: frames are decoded scaled down (aspect ratio kept, never up) so that their
    shorter side is this many pixels: the size the backbone needs (``Backbone.decode_side``),
    cheaper than decoding full frames and resizing afterwards; None decodes full frames.
    """

    mode: str = "uniform"
    num_frames: int = 8
    fps: float = 1.0
    max_seconds: float | None = None
    short_side: int | None = None

    def frame_size(self, width: int, height: int) -> tuple[int, int] | None:
        """The ``(width, height)`` to decode a ``width x height`` video at; None for full frames."""
        if self.short_side is None or min(width, height) <= self.short_side:
            return None
        scale = self.short_side / min(width, height)
        return max(1, round(width * scale)), max(1, round(height * scale))

    def indices(self, total: int, native_fps: float) -> list[int]:
        """Frame indices to decode from a video of ``total`` frames at ``native_fps``."""
        if self.max_seconds is not None and native_fps > 0:  # frame i is at i / native_fps seconds
            total = min(total, int(self.max_seconds * native_fps) + 1)
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


@dataclass(frozen=True)
class Decoded:
    """The sampled frames of one video (or a pre-extracted feature array) and where they came from.

    ``decoder`` is ``"decord"`` or ``"pyav"`` (None for imported features); ``fallback_reason``
    says why decord's frames were not used when PyAV produced them."""

    frames: np.ndarray
    decoder: str | None = None
    fallback_reason: str | None = None


def _first_line(exc: BaseException | None) -> str:
    """The first line of an error's message, without decord's ``[hh:mm:ss] file.cc:123:`` prefix."""
    lines = str(exc).strip().splitlines() if exc is not None else []
    return (re.sub(r"^\[[\d:]+\]\s*\S+:\d+:\s*", "", lines[0]) if lines else type(exc).__name__)[:200]


def _check(frames: np.ndarray, count: int) -> np.ndarray:
    """``frames`` if it is ``count`` RGB uint8 frames of one size; else DecodeError."""
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[0] != count or frames.shape[3] != 3 \
            or 0 in frames.shape:
        raise DecodeError(f"unexpected frame array of shape {frames.shape} ({frames.dtype}), wanted {count} frames")
    return frames


def read_decord(path: Path, sampling: Sampling) -> np.ndarray:
    """The sampled frames as decord decodes them (frame count and rate from the container)."""
    import decord

    try:
        size = sampling.frame_size(*_probe_size(path)) if sampling.short_side is not None else None
        scaled = {"width": size[0], "height": size[1]} if size else {}
        reader = decord.VideoReader(str(path), num_threads=1, **scaled)
        total = len(reader)
        indices = sampling.indices(total, reader.get_avg_fps())
        frames = reader.get_batch(indices).asnumpy() if indices else np.zeros((0, 0, 0, 3), np.uint8)
    except Exception as exc:  # noqa: BLE001 - decord raises RuntimeError, DECORDError, AssertionError...
        raise DecodeError(_first_line(exc)) from None
    if not indices:
        raise DecodeError("no video frames")
    if size and frames.shape[1:3] != (size[1], size[0]):
        raise DecodeError(f"decord scaled to {frames.shape[2]}x{frames.shape[1]}, not {size[0]}x{size[1]}")
    return _check(frames, len(indices))


def _probe_size(path: Path) -> tuple[int, int]:
    """Width and height of the first video stream, from the container's header: a small probe
    (FFmpeg's default analyses up to 5 s of stream, 40 ms for a 720p mp4, 2 ms this way)."""
    import av

    with av.open(str(path), options={"probesize": "32", "analyzeduration": "0"}) as container:
        if not container.streams.video:
            raise DecodeError("no video stream")
        context = container.streams.video[0].codec_context
        if not context.width or not context.height:
            raise DecodeError("the video stream declares no frame size")
        return int(context.width), int(context.height)


def _native_fps(stream: Any) -> float:
    """Average frame rate of a PyAV stream, as decord reports it (the container's average rate)."""
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate:
            return float(rate)
    return 0.0


def _decode_picks(path: Path, wanted: Iterable[int], sampling: Sampling) -> tuple[dict[int, np.ndarray], int]:
    """Decode every frame of ``path``'s first video stream in presentation order; return the RGB
    frames at the ``wanted`` indices (scaled as ``sampling`` says, with FFmpeg's area filter) and
    the number of frames decoded. A packet FFmpeg cannot decode is skipped, as the ``ffmpeg``
    tool does; DecodeError when no frame decodes at all."""
    import av

    wanted, picks, count, size, error = set(wanted), {}, 0, None, None
    interpolation: str | None = None
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        for packet in container.demux(stream):
            try:
                frames = packet.decode()
            except av.FFmpegError as exc:
                error = error or exc
                continue
            for frame in frames:
                if size is None:  # a stream that changes size keeps the first
                    size = sampling.frame_size(frame.width, frame.height) or (frame.width, frame.height)
                    interpolation = "AREA" if size != (frame.width, frame.height) else None
                if count in wanted:
                    picks[count] = frame.to_ndarray(format="rgb24", width=size[0], height=size[1],
                                                    interpolation=interpolation)
                count += 1
    if count == 0:
        raise DecodeError(_first_line(error) if error is not None else "no video frames")
    return picks, count


def _declared_frames(container: Any, stream: Any) -> int:
    """The frame count the container declares, else its packet count (demuxed, not decoded)."""
    if stream.frames > 0:
        return int(stream.frames)
    return sum(1 for packet in container.demux(stream) if packet.size)


def read_pyav(path: Path, sampling: Sampling) -> np.ndarray:
    """The sampled frames as PyAV decodes them: the same indices as decord's for the same frame
    count, with the count established by decoding. One decoding pass when the container's count
    is right; a second when it was wrong and the first pass missed a sampled frame."""
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise DecodeError("no video stream")
            stream = container.streams.video[0]
            fps, declared = _native_fps(stream), _declared_frames(container, stream)
        picks, total = _decode_picks(path, sampling.indices(declared, fps), sampling)
        indices = sampling.indices(total, fps)
        if any(i not in picks for i in indices):
            picks, total = _decode_picks(path, indices, sampling)
            indices = sampling.indices(total, fps)
    except DecodeError:
        raise
    except Exception as exc:  # noqa: BLE001 - av.FFmpegError, and whatever a broken file provokes
        raise DecodeError(_first_line(exc)) from None
    if any(i not in picks for i in indices):
        raise DecodeError("the frame count changed between two decodes")
    return _check(np.stack([picks[i] for i in indices]), len(indices))


READERS = {"decord": read_decord, "pyav": read_pyav}


def decode_video(path: Path, sampling: Sampling, decoders: tuple[str, ...] = DECODERS) -> Decoded:
    """The sampled frames of ``path`` from the first of ``decoders`` that reads it; DecodeError
    with every decoder's reason when none does."""
    path = Path(path)
    if not path.is_file():
        raise DecodeError("missing file")
    if path.stat().st_size == 0:
        raise DecodeError("empty file")
    reasons = []
    for name in decoders:
        try:
            frames = READERS[name](path, sampling)
        except DecodeError as exc:
            reasons.append(f"{name}: {exc}")
            continue
        return Decoded(frames, name, "; ".join(reasons) or None)
    raise DecodeError(f"decode error: {'; '.join(reasons)}", tuple(decoders))


def read_frames(path: Path, sampling: Sampling) -> np.ndarray:
    """Decode the sampled frames of ``path`` as uint8 ``(T, H, W, 3)``; raise DecodeError."""
    return decode_video(path, sampling).frames


def thumbnail_png(frame: np.ndarray, size: int = THUMB_SIZE) -> bytes:
    """A frame shrunk to fit ``size`` x ``size``, as PNG bytes."""
    from PIL import Image

    image = Image.fromarray(np.ascontiguousarray(frame))
    image.thumbnail((size, size))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
