"""Exact top-10 for 1,000 queries over 1,000,000 x 256 float32 embeddings (random, normalised):
ssbctl's chunked search side by side with faiss IndexFlatIP and numpy, in one run.

Each method runs in its own process on the same data (same seed), so its peak memory is its own:
reported as peak RSS above the resident data. Agreement is the overlap of each method's top-10
set with numpy's, averaged over queries.

    python benchmarks/retrieval.py                  # needs faiss-cpu (pip install 'ssbctl[faiss]')
    python benchmarks/retrieval.py --n 200000       # smaller
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def data(n: int, q: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    queries = rng.standard_normal((q, dim), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return x, queries


def search(method: str, x: np.ndarray, queries: np.ndarray, k: int, dim: int) -> np.ndarray:
    """Exact top-k rows by one method (imports are done before timing)."""
    if method == "ssbctl":
        import torch

        from ssbctl.retrieval.index import topk_search

        return topk_search(torch.from_numpy(queries), torch.from_numpy(x), k)[1].numpy()
    if method == "faiss":
        import faiss

        index = faiss.IndexFlatIP(dim)
        index.add(x)
        return index.search(queries, k)[1]
    n, q = x.shape[0], queries.shape[0]
    best_s = np.full((q, 0), -np.inf, np.float32)  # numpy, chunked so it fits
    best_r = np.zeros((q, 0), np.int64)
    for lo in range(0, n, 65536):
        s = queries @ x[lo:lo + 65536].T
        part = np.argpartition(-s, k - 1, axis=1)[:, :k]
        best_s = np.concatenate([best_s, np.take_along_axis(s, part, 1)], 1)
        best_r = np.concatenate([best_r, part + lo], 1)
        keep = np.argpartition(-best_s, k - 1, axis=1)[:, :k]
        best_s, best_r = np.take_along_axis(best_s, keep, 1), np.take_along_axis(best_r, keep, 1)
    return best_r


def run_method(method: str, n: int, q: int, dim: int, k: int, out: Path, repeat: int) -> dict:
    if method == "ssbctl":  # import before timing
        import ssbctl.retrieval.index  # noqa: F401
    elif method == "faiss":
        import faiss  # noqa: F401
    x, queries = data(n, q, dim)
    try:  # forget the peak of making the data: only the search's own peak is reported
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    base = rss_mib("VmRSS")
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        rows = search(method, x, queries, k, dim)
        times.append(time.perf_counter() - start)
    seconds = min(times)
    np.save(out, np.sort(rows, axis=1))
    return {"method": method, "seconds": seconds, "peak_mib_above_data": rss_mib("VmHWM") - base}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3, help="Searches per method; the fastest is reported.")
    parser.add_argument("--method", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.method:
        print(json.dumps(run_method(args.method, args.n, args.queries, args.dim, args.k, args.out, args.repeat)))
        return
    work = Path(tempfile.mkdtemp(prefix="ssb-retrieval-"))
    results = {}
    for method in ("numpy", "faiss", "ssbctl"):
        proc = subprocess.run([sys.executable, __file__, "--method", method, "--n", str(args.n),
                               "--queries", str(args.queries), "--dim", str(args.dim), "--k", str(args.k),
                               "--repeat", str(args.repeat),
                               "--out", str(work / f"{method}.npy")], capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"# {method} failed: {proc.stderr.strip().splitlines()[-1]}", file=sys.stderr)
            continue
        results[method] = json.loads(proc.stdout.strip().splitlines()[-1])
    ref = np.load(work / "numpy.npy")
    print(f"exact top-{args.k}, {args.queries} queries x {args.n:,} x {args.dim} float32; "
          f"best of {args.repeat} runs each")
    print("| method | seconds | queries/s | peak MiB above data | top-10 agreement with numpy | speed vs faiss |")
    print("|---|---|---|---|---|---|")
    faiss_s = results.get("faiss", {}).get("seconds")
    for method, r in results.items():
        rows = np.load(work / f"{method}.npy")
        agree = np.mean([len(set(a) & set(b)) / args.k for a, b in zip(rows, ref)])
        ratio = f"{faiss_s / r['seconds']:.2f}x" if faiss_s else "n/a"
        print(f"| {method} | {r['seconds']:.2f} | {args.queries / r['seconds']:.0f} | {r['peak_mib_above_data']:.0f} | "
              f"{agree:.4f} | {ratio} |")


if __name__ == "__main__":
    main()
