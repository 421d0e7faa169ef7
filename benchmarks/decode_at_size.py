"""Decode at the size the backbone needs, or decode full frames and resize afterwards: videos/s and
how far the pixels backbone's features move, on generated H.264 clips (PyAV, libx264).

Three ways to the pixels backbone's ``size x size`` features, same clips, same sampled frames:
``full``: decord decodes full frames, the backbone area-resizes them (what `prepare` does today);
``scaled xM``: decord decodes at ``M * size`` square (its ``width``/``height``, FFmpeg's scaler),
the backbone area-resizes by the remaining integer factor; ``direct``: decord decodes at
``size x size``. The same by PyAV, scaling in its ``to_ndarray`` reformat (swscale, default or
area filter). The feature difference is the max and mean absolute difference from decord ``full``,
in the backbone's units (pixels scaled to [-1, 1], so 2/255 is one grey level).

    python benchmarks/decode_at_size.py --videos 20 --width 1280 --height 720
    python benchmarks/decode_at_size.py --videos 60 --width 224 --height 224
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch


def make_clip(path: Path, width: int, height: int, frames: int, seed: int) -> None:
    """A moving-gradient H.264 clip (yuv420p, 8 fps) with noise, so the encoder has detail to keep."""
    import av

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for t in range(frames):
            r = (xx * 255 // max(width - 1, 1) + 9 * t) % 256
            g = (yy * 255 // max(height - 1, 1) + 5 * t) % 256
            b = ((xx + yy) // 8 * 37 + seed * 11) % 256
            img = np.stack([r, g, b], -1).astype(np.int16) + rng.integers(-20, 21, (height, width, 3))
            frame = av.VideoFrame.from_ndarray(np.clip(img, 0, 255).astype(np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def decode(path: Path, count: int, side: int | None) -> np.ndarray:
    """``count`` uniformly sampled frames, decoded by decord at ``side x side`` (None: full size)."""
    import decord

    from ssbctl.data.video import Sampling

    size = {} if side is None else {"width": side, "height": side}
    reader = decord.VideoReader(str(path), num_threads=1, **size)
    return reader.get_batch(Sampling("uniform", count).indices(len(reader), reader.get_avg_fps())).asnumpy()


def decode_pyav_area(path: Path, count: int, side: int | None) -> np.ndarray:
    """:func:`decode_pyav` with swscale's area filter (an average, like the backbone's resize)."""
    return decode_pyav(path, count, side, "AREA")


def decode_pyav(path: Path, count: int, side: int | None, interpolation: str | None = None) -> np.ndarray:
    """The same frames by PyAV, sequentially; converted (and scaled, FFmpeg's swscale) in the
    decoder's reformat when ``side`` is given."""
    import av

    from ssbctl.data.video import Sampling

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        total = stream.frames
        wanted = set(Sampling("uniform", count).indices(total, float(stream.average_rate or 8)))
        size: dict[str, Any] = {} if side is None else {"width": side, "height": side}
        if interpolation and side is not None:
            size["interpolation"] = interpolation
        picks = [frame.to_ndarray(format="rgb24", **size)
                 for i, frame in enumerate(container.decode(stream)) if i in wanted]
    return np.stack(picks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=20)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--frames", type=int, default=12, help="Sampled frames per video.")
    parser.add_argument("--size", type=int, default=16, help="The pixels backbone's size.")
    args = parser.parse_args()
    from ssbctl.data.backbones import PixelsBackbone

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="ssb-decode-size-"))
    clips = [work / f"{i}.mp4" for i in range(args.videos)]
    for i, clip in enumerate(clips):
        make_clip(clip, args.width, args.height, int(args.seconds * 8), i)
    backbone = PixelsBackbone(args.size)
    ways = {"decord full": (decode, None), "decord scaled x4": (decode, 4 * args.size),
            "decord scaled x2": (decode, 2 * args.size), "decord direct": (decode, args.size),
            "pyav full": (decode_pyav, None), "pyav scaled x4": (decode_pyav, 4 * args.size),
            "pyav direct": (decode_pyav, args.size), "pyav direct, AREA filter": (decode_pyav_area, args.size),
            "pyav scaled x4, AREA filter": (decode_pyav_area, 4 * args.size)}
    features: dict[str, list[torch.Tensor]] = {w: [] for w in ways}
    seconds = {w: 0.0 for w in ways}
    failed: dict[str, str] = {}
    for clip in clips:  # interleaved per clip, so load changes hit every way alike
        for way, (reader, side) in ways.items():
            if way in failed:
                continue
            start = time.perf_counter()
            try:
                features[way].append(backbone.encode(reader(clip, args.frames, side)))
            except Exception as exc:  # noqa: BLE001 - decord rejects some widths; reported, not fatal
                failed[way] = str(exc).strip().splitlines()[-1][:120]
            seconds[way] += time.perf_counter() - start
    print(f"{args.videos} H.264 clips {args.width}x{args.height}, {args.seconds:g} s at 8 fps, {args.frames} frames "
          f"each -> pixels backbone {args.size}x{args.size}; 1 thread; load average {os.getloadavg()[0]:.2f}")
    print("| way | videos/s | vs full | max abs feature diff | mean abs feature diff |")
    print("|---|---|---|---|---|")
    ref = torch.cat(features["decord full"])
    for way in ways:
        if way in failed:
            print(f"| {way} | fails: {failed[way]} | | | |")
            continue
        diff = (torch.cat(features[way]) - ref).abs()
        print(f"| {way} | {args.videos / seconds[way]:.1f} | {seconds['decord full'] / seconds[way]:.2f}x | "
              f"{float(diff.max()):.4f} | {float(diff.mean()):.4f} |")


if __name__ == "__main__":
    main()
