"""Exact top-k search, like for like: ssbctl ``Index.top`` beside faiss ``IndexFlatIP.search``,
side by side in one process on the same data, SEARCH ALONE on both sides. Building (faiss
``index.add``; ssbctl's one-off bf16 copy of the gallery) is timed and reported separately.

Two galleries of ``--n`` x ``--dim`` float32 unit vectors: isotropic random, and clustered
(``--centres`` centres, rows sorted by cluster, queries drawn from the same mixture). Each search
runs ``--repeat`` times, alternating the two; the best time of each and the median of the per-round
ratios are reported, with the load average beside them. Agreement: the overlap of the top-k sets
with faiss, and with a float64 brute force on ``--check`` queries (exact agreement). Rates are
against the machine's fp32 matmul peak (benchmarks/matmul_peak.py), measured in the same run.

    python benchmarks/retrieval.py --n 100000            # quick
    python benchmarks/retrieval.py                       # the issue's configuration: 1M x 256, 1,000 queries
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from matmul_peak import describe, matmul_peak
from ssbctl.retrieval.exact import screening_pays
from ssbctl.retrieval.index import Index
from ssbctl.retrieval.scan import topk_search


def load() -> str:
    """The 1-minute load average (other work on the machine skews every timing)."""
    return f"{os.getloadavg()[0]:.2f}"


def rss_mib(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> float:
    """Reset the peak RSS (Linux) and return the current RSS: the baseline of what follows."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return rss_mib()


def galleries(kind: str, n: int, q: int, dim: int, centres: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(gallery, queries)`` unit vectors: isotropic, or clustered with rows sorted by cluster."""
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        x, queries = torch.randn(n, dim, generator=g), torch.randn(q, dim, generator=g)
    else:
        c = torch.nn.functional.normalize(torch.randn(centres, dim, generator=g), dim=1)
        labels = torch.sort(torch.randint(0, centres, (n,), generator=g)).values
        x = torch.empty(n, dim)
        for lo in range(0, n, 65536):  # chunked: no second full-size temporary
            part = labels[lo:lo + 65536]
            x[lo:lo + 65536] = c[part] + torch.randn(len(part), dim, generator=g) / dim ** 0.5
        queries = c[torch.randint(0, centres, (q,), generator=g)] + torch.randn(q, dim, generator=g) / dim ** 0.5
    x /= x.norm(dim=1, keepdim=True)
    return x, torch.nn.functional.normalize(queries, dim=1)


def brute_force(queries: torch.Tensor, x: torch.Tensor, k: int) -> np.ndarray:
    """Exact top-k rows in float64 (chunked)."""
    best_s = torch.full((len(queries), 0), float("-inf"), dtype=torch.float64)
    best_r = torch.zeros(len(queries), 0, dtype=torch.long)
    q = queries.double()
    for lo in range(0, len(x), 65536):
        s = q @ x[lo:lo + 65536].double().t()
        top = s.topk(min(k, s.shape[1]), dim=1)
        best_s, idx = torch.cat([best_s, top.values], 1).topk(k, dim=1)
        best_r = torch.cat([best_r, top.indices + lo], 1).gather(1, idx)
    return best_r.numpy()


def overlap(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([len(set(x) & set(y)) / len(y) for x, y in zip(a, b)]))


CPU: dict[str, list[float]] = {}


def timed(fn: Callable[[], Any], method: str = "") -> tuple[float, Any]:
    """Wall seconds and result; the process CPU seconds go to ``CPU[method]`` (steadier when
    other work shares the machine)."""
    cpu, start = time.process_time(), time.perf_counter()
    out = fn()
    CPU.setdefault(method, []).append(time.process_time() - cpu)
    return time.perf_counter() - start, out


def run_gallery(kind: str, args: argparse.Namespace, peak: float) -> list[str]:
    """Build both, search alternately ``--repeat`` times, check agreement; markdown rows."""
    import faiss

    x, queries = galleries(kind, args.n, args.queries, args.dim, args.centres)
    qn = queries.numpy()
    base = reset_peak()
    faiss_build, index = timed(lambda: faiss.IndexFlatIP(args.dim))
    add_s, _ = timed(lambda: index.add(x.numpy()))
    faiss_build_mib = rss_mib("VmHWM") - base
    base = reset_peak()
    records = [{"video_id": "", "path": ""}] * args.n  # one shared dict: the search never reads them
    ours = Index(x, records)
    build_s, _ = timed(lambda: ours.top(queries[:1], args.k))  # builds the bf16 copy (+ one query)
    build_mib = rss_mib("VmHWM") - base
    screened = screening_pays(args.n)
    times: dict[str, list[float]] = {"faiss": [], "ssbctl": [], "fp32": []}
    peaks: dict[str, float] = {"faiss": 0.0, "ssbctl": 0.0, "fp32": 0.0}
    rows: dict[str, np.ndarray] = {}
    loads = []
    for r in range(args.repeat):
        order = ["faiss", "ssbctl"] if r % 2 == 0 else ["ssbctl", "faiss"]
        if args.fp32_scan and r == 0:
            order.append("fp32")
        for method in order:
            loads.append(load())
            base = reset_peak()
            if method == "faiss":
                seconds, (_, found) = timed(lambda: index.search(qn, args.k), f"{kind}/faiss")
            elif method == "ssbctl":
                seconds, (_, found) = timed(lambda: ours.top(queries, args.k), f"{kind}/ssbctl")
                found = torch.stack(found).numpy()
            else:
                seconds, (_, found) = timed(lambda: topk_search(queries, x, args.k), f"{kind}/fp32")
                found = found.numpy()
            peaks[method] = max(peaks[method], rss_mib("VmHWM") - base)
            times[method].append(seconds)
            rows[method] = np.asarray(found)
    exact = brute_force(queries[: args.check], x, args.k)
    flops = 2.0 * args.queries * args.n * args.dim
    ratios = [s / f for s, f in zip(times["ssbctl"], times["faiss"])]
    out = []
    for method, label in (("faiss", "faiss IndexFlatIP.search"),
                          ("ssbctl", f"ssbctl Index.top ({'bf16 screen, float64 re-score' if screened else 'fp32'})"),
                          ("fp32", "ssbctl fp32 scan (topk_search, the old path)")):
        if not times[method]:
            continue
        best = min(times[method])
        ratio = (f"{statistics.median(ratios):.2f}" if method == "ssbctl"
                 else "1.00" if method == "faiss" else f"{best / min(times['faiss']):.2f}")
        out.append(f"| {kind} | {label} | {best:.3f} | {ratio} | {flops / best / 1e9:.0f} | "
                   f"{flops / best / 1e9 / peak:.0%} | {overlap(rows[method], rows['faiss']):.4f} | "
                   f"{overlap(rows[method][: args.check], exact):.4f} | {peaks[method]:.0f} |")
    out.append(f"| {kind} | build: faiss add {add_s + faiss_build:.3f} s (+{faiss_build_mib:.0f} MiB); "
               f"ssbctl bf16 copy {build_s:.3f} s (+{build_mib:.0f} MiB) | | | | | | | |")
    cpu = {m: min(CPU[f"{kind}/{m}"]) for m in times if f"{kind}/{m}" in CPU}
    out.append(f"| {kind} | load average during the searches: {', '.join(loads)}; per-round ssbctl/faiss: "
               f"{', '.join(f'{r:.2f}' for r in ratios)}; process CPU s (best): "
               f"{', '.join(f'{m} {c:.2f}' for m, c in cpu.items())}, ssbctl/faiss "
               f"{cpu['ssbctl'] / cpu['faiss']:.2f} | | | | | | | |")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000, help="Gallery rows (1,000,000 is the issue's size).")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--centres", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3, help="Searches per method, alternating.")
    parser.add_argument("--check", type=int, default=100, help="Queries checked against a float64 brute force.")
    parser.add_argument("--gallery", choices=["random", "clustered", "both"], default="both")
    parser.add_argument("--fp32-scan", action="store_true", help="Also time the plain fp32 scan once.")
    parser.add_argument("--no-peak", action="store_true", help="Skip measuring the matmul peak.")
    args = parser.parse_args()
    print(f"load average at start: {load()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    peak = float("nan")
    if not args.no_peak:
        measured = matmul_peak()
        print(describe(measured))
        peak = measured["peak_gflops"]
    print(f"\nexact top-{args.k}, {args.queries} queries x {args.n:,} x {args.dim} float32; search only "
          f"(build separate); best of {args.repeat}; ratio = median per-round ssbctl/faiss time")
    print("| gallery | method | search s | time vs faiss | GFLOP/s (2QND/t) | of fp32 peak | top-k agreement "
          f"with faiss | exact agreement ({args.check} queries, float64) | peak MiB above data |")
    print("|---|---|---|---|---|---|---|---|---|")
    for kind in (["random", "clustered"] if args.gallery == "both" else [args.gallery]):
        for line in run_gallery(kind, args, peak):
            print(line, flush=True)
    print(f"load average at end: {load()}")


if __name__ == "__main__":
    main()
