"""Prepare throughput: videos/s of the whole `prepare` pipeline next to decode-only speed, with
frames decoded full-size and resized afterwards, or at the size the backbone needs (the default).

Same clips, same frame sampling. "decode only" is decord in one process, no backbone, no store:
the issue's baseline (full frames). The pipeline adds crash-isolated decoding in worker
processes, the backbone, the resumable work folder and the final merge into the store.

    python benchmarks/prepare_throughput.py --videos 200 --size 224            # generated shapes clips
    python benchmarks/prepare_throughput.py --videos 24 --footage FILE.mp4     # copies of real footage
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from ssbctl.data.backbones import parse_backbone
from ssbctl.data.datasets import VideoItem, read_custom
from ssbctl.data.datasets.shapes import ShapesSpec, generate
from ssbctl.data.prepare import PrepareOptions, at_backbone_size, prepare
from ssbctl.data.video import Sampling, read_decord


def footage_items(files: list[Path], count: int, folder: Path) -> list[VideoItem]:
    """``count`` videos: hard links (or copies) of ``files`` in turn, each under its own name."""
    folder.mkdir(parents=True)
    items = []
    for i in range(count):
        source = files[i % len(files)]
        target = folder / f"v{i:05d}{source.suffix}"
        try:
            target.hardlink_to(source)
        except OSError:
            shutil.copyfile(source, target)
        items.append(VideoItem(video_id=target.stem, path=target, captions=["a video"], split="test"))
    return items


def decode_rate(items: list[VideoItem], sampling: Sampling) -> float:
    start = time.perf_counter()
    for item in items:
        read_decord(item.path, sampling)
    return len(items) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=120)
    parser.add_argument("--size", type=int, default=128, help="Frame size of the generated clips.")
    parser.add_argument("--footage", type=Path, nargs="+", default=None,
                        help="Real video files to use (repeated to --videos) instead of generated clips.")
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--backbone", default="pixels", help="pixels, clip:MODEL or hf:MODEL")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ssb-prep-bench-"))
    if args.footage:
        items = footage_items(args.footage, args.videos, work / "raw")
        what = f"{len(items)} copies of {', '.join(p.name for p in args.footage)}"
    else:
        spec = replace(ShapesSpec(), num_videos=args.videos, frame_size=args.size, min_seconds=4, max_seconds=6)
        items = read_custom(generate(work / "raw", spec))
        what = f"{len(items)} clips, {args.size}x{args.size}, 4-6 s at 8 fps"
    backbone = parse_backbone(args.backbone)
    full = Sampling(mode="uniform", num_frames=args.frames)
    at_size = at_backbone_size(PrepareOptions(full), [backbone]).sampling
    decode = decode_rate(items, full)
    print(f"{what}, {args.frames} frames each, backbone {args.backbone} (decoded at: shorter side "
          f"{at_size.short_side} px)")
    print("| pipeline | videos/s | vs decode-only (full frames) |")
    print("|---|---|---|")
    print(f"| decord decode only, full frames (1 process) | {decode:.1f} | 1.00x |")
    rate = decode_rate(items, at_size)
    print(f"| decord decode only, at the backbone's size (1 process) | {rate:.1f} | {rate / decode:.2f}x |")
    for full_frames in (True, False):
        for workers in args.workers:
            out = work / f"store-{workers}-{full_frames}"
            start = time.perf_counter()
            prepare("custom", items, [backbone], [out], PrepareOptions(full, workers=workers, full_frames=full_frames))
            rate = len(items) / (time.perf_counter() - start)
            how = "full frames" if full_frames else "at the backbone's size (default)"
            print(f"| ssbctl prepare, {workers} decode workers, {how} | {rate:.1f} | {rate / decode:.2f}x |",
                  flush=True)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
