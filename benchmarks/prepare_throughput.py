"""Prepare throughput: videos/s of the whole `prepare` pipeline next to decord's decode-only speed.

Same clips, same frame sampling. The pipeline adds crash-isolated decoding in worker processes,
the backbone, the resumable work folder and the final merge into the store.

    python benchmarks/prepare_throughput.py --videos 120 --size 128 --workers 2
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from ssbctl.data.backbones import parse_backbone
from ssbctl.data.datasets import read_custom
from ssbctl.data.datasets.shapes import ShapesSpec, generate
from ssbctl.data.prepare import PrepareOptions, prepare
from ssbctl.data.video import Sampling, read_frames


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=120)
    parser.add_argument("--size", type=int, default=128, help="Frame size of the generated clips.")
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--backbone", default="pixels", help="pixels, clip:MODEL or hf:MODEL")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ssb-prep-bench-"))
    spec = replace(ShapesSpec(), num_videos=args.videos, frame_size=args.size, min_seconds=4, max_seconds=6)
    items = read_custom(generate(work / "raw", spec))
    sampling = Sampling(mode="uniform", num_frames=args.frames)
    start = time.perf_counter()
    for item in items:
        read_frames(item.path, sampling)
    decode = len(items) / (time.perf_counter() - start)
    print(f"{len(items)} clips, {args.size}x{args.size}, 4-6 s at 8 fps, {args.frames} frames each, "
          f"backbone {args.backbone}")
    print("| pipeline | videos/s | vs decode-only |")
    print("|---|---|---|")
    print(f"| decord decode only (1 process) | {decode:.1f} | 1.00x |")
    backbone = parse_backbone(args.backbone)
    for workers in args.workers:
        out = work / f"store-{workers}"
        start = time.perf_counter()
        prepare("custom", items, [backbone], [out], PrepareOptions(sampling, workers=workers))
        rate = len(items) / (time.perf_counter() - start)
        print(f"| ssbctl prepare, {workers} decode workers | {rate:.1f} | {rate / decode:.2f}x |")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
