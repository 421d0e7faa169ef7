"""Scale curve: exact search time at 10k, 100k, 1M and 4M rows (faiss flat search beside it, search
alone, build/add excluded), and `prepare` time at 100, 1,000 and 2,000 videos: does each grow
linearly with the data?

Search: random unit vectors (``benchmarks/retrieval.py``'s isotropic gallery), ``--queries``
queries, top-10, best of ``--repeat`` for each side; the last columns divide by the row count so
linear growth shows as a flat column. Prepare: generated shapes clips (the demo's 64 px clips),
the pixels backbone, default options (2 crash-isolating decode workers); the first N clips of
one generated set, so each size is a prefix of the next.

    python benchmarks/scale.py                                   # both tables
    python benchmarks/scale.py --rows 10000,100000 --videos 100  # quick
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from retrieval import galleries, load
from ssbctl.data.backbones import build_backbone
from ssbctl.data.datasets import read_custom
from ssbctl.data.datasets.shapes import ShapesSpec, generate
from ssbctl.data.prepare import PrepareOptions, prepare
from ssbctl.data.video import Sampling
from ssbctl.retrieval.index import Index


def best_of(repeat: int, fn: Callable[[], object]) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def search_times(n: int, queries: int, repeat: int) -> tuple[float, float]:
    """Best search seconds of ssbctl's exact Index.top and of faiss IndexFlatIP over ``n`` rows."""
    import faiss

    x, q = galleries("random", n, queries, 256, 1000)
    index = Index(x, [{"video_id": "", "path": ""}] * n)
    index.top(q[:1], 10)  # builds the bf16 copy where the screen is used (build, not search)
    ours = best_of(repeat, functools.partial(index.top, q, 10))
    flat = faiss.IndexFlatIP(256)
    flat.add(x.numpy())
    return ours, best_of(repeat, functools.partial(flat.search, q.numpy(), 10))


def search_rows(sizes: list[int], queries: int, repeat: int) -> None:
    print(f"# exact top-10, {queries} queries x N x 256 float32, random gallery, search alone, best of {repeat}; "
          f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}")
    print("| rows | ssbctl Index.top s | faiss search s | ssbctl / faiss | ssbctl us per 1k rows | "
          "faiss us per 1k rows | load |")
    print("|---|---|---|---|---|---|---|")
    for n in sizes:
        ours, theirs = search_times(n, queries, repeat)
        per = 1e6 * 1000 / n
        print(f"| {n:,} | {ours:.3f} | {theirs:.3f} | {ours / theirs:.2f} | {ours * per:.1f} | {theirs * per:.1f} "
              f"| {load()} |", flush=True)


def prepare_rows(counts: list[int], work: Path) -> None:
    spec = ShapesSpec(num_videos=max(counts))
    items = read_custom(generate(work / "raw", spec))
    print(f"# prepare: shapes clips ({spec.frame_size} px, {spec.min_seconds}-{spec.max_seconds} s), pixels backbone, "
          f"default options (2 decode workers), 8 uniform frames")
    print("| videos | seconds | videos/s | ms per video | load |")
    print("|---|---|---|---|---|")
    for n in counts:
        out = work / f"store-{n}"
        start = time.perf_counter()
        prepare("custom", items[:n], [build_backbone("pixels")], [out], PrepareOptions(Sampling()))
        seconds = time.perf_counter() - start
        print(f"| {n:,} | {seconds:.1f} | {n / seconds:.1f} | {1000 * seconds / n:.1f} | {load()} |", flush=True)
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="10000,100000,1000000,4000000", help="Gallery sizes ('' skips search).")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--videos", default="100,1000,2000", help="Prepare sizes ('' skips prepare).")
    args = parser.parse_args()
    if args.rows:
        search_rows([int(s) for s in args.rows.split(",")], args.queries, args.repeat)
    if args.videos:
        with tempfile.TemporaryDirectory(prefix="ssb-scale-") as tmp:
            prepare_rows([int(s) for s in args.videos.split(",")], Path(tmp))


if __name__ == "__main__":
    main()
