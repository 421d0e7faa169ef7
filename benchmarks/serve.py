"""Latency of ``ssbctl serve``'s ``/api/search`` under load: indexes of synthetic embeddings (10k
and 100k rows by default), 8 concurrent loopback clients for a bounded time each, over the real
server (``ssbctl serve`` started as a process, its model loaded once).

Each request is a different text query (k=10), sent over a kept-alive HTTP connection. Reported per
index size: requests, errors, requests/s, end-to-end latency p50/p95/p99/max, and the server's own
encode + search time (its ``Server-Timing`` header: the batch the query was answered in). The goal
is p95 <= 100 ms at 100k on 2 CPU cores with zero errors.

    python benchmarks/serve.py                            # builds a small run (shapes recipe, 2 steps)
    python benchmarks/serve.py --run RUN --seconds 30     # an existing run's text encoder
    python benchmarks/serve.py --sizes 10000,100000,1000000
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import quote

WORDS = {  # queries in the shapes vocabulary, all different
    "size": ["small", "large", "big", "little", "tiny"],
    "colour": ["red", "green", "blue", "yellow", "purple", "white", "crimson", "golden", "violet"],
    "shape": ["circle", "ball", "square", "box", "triangle", "cross", "disc", "block", "wedge"],
    "motion": ["moves to the left", "moves to the right", "rises", "falls", "grows", "shrinks", "spins",
               "stays still", "slides left", "floats up"],
}


def queries(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(["a", *(rng.choice(w) for w in WORDS.values()), f"number {i}"]) for i in range(n)]


def build_run(work: Path) -> Path:
    """A run of the shipped shapes recipe (its real text encoder), trained 2 steps on 16 tiny clips."""
    from ssbctl.config import load_recipe
    from ssbctl.data.backbones import build_backbone
    from ssbctl.data.datasets.shapes import ShapesSpec
    from ssbctl.data.prepare import dataset_items, prepare_items
    from ssbctl.data.video import Sampling
    from ssbctl.training import train

    spec = ShapesSpec(num_videos=16, frame_size=32, min_seconds=1.0, max_seconds=1.5)
    items = dataset_items("shapes", work / "raw", None, spec, None)
    prepare_items(items, work / "data", "shapes", build_backbone("pixels"), Sampling())
    recipe = load_recipe("shapes", [f'data.prepared="{work / "data"}"', f'train.output_dir="{work / "run"}"',
                                    "train.max_steps=2", "train.batch_size=8", 'data.eval_split=""'])
    train(recipe, work / "run")
    return work / "run"


def build_index(run: Path, n: int, folder: Path) -> None:
    """An index of ``n`` random unit vectors in the run's embedding size, recorded as made by ``run``."""
    import torch

    from ssbctl.inference.run import load_run
    from ssbctl.retrieval.index import Index, index_meta

    loaded = load_run(run, device="cpu")
    gen = torch.Generator().manual_seed(n)
    embeddings = torch.nn.functional.normalize(torch.randn(n, loaded.model.cfg.embed_dim, generator=gen), dim=1)
    rows = [{"video_id": f"v{i:07d}", "path": "", "split": ""} for i in range(n)]
    Index(embeddings, rows, index_meta(loaded, folder)).save(folder)


def start_server(index: Path, threads: int | None) -> tuple[subprocess.Popen, int]:
    extra = ["--threads", str(threads)] if threads else []
    proc = subprocess.Popen([sys.executable, "-m", "ssbctl", "serve", str(index), "--port", "0", "--device", "cpu",
                             *extra],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    assert proc.stderr is not None
    for line in proc.stderr:
        if line.startswith("serving "):
            url = line.split(" at ", 1)[1].split(" ", 1)[0]
            threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep draining
            return proc, int(url.rsplit(":", 1)[1].split("/", 1)[0])
    raise SystemExit(f"ssbctl serve exited {proc.wait()}")


Result = tuple[float, float, int, int]  # seconds, server seconds, status (negative: a bad body), batch size


def client(port: int, texts: list[str], k: int, until: float, out: list[Result]) -> None:
    """Send queries back to back until ``until``: a :data:`Result` per request."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    i = 0
    while time.perf_counter() < until:
        path = f"/api/search?q={quote(texts[i % len(texts)])}&k={k}"
        i += 1
        start = time.perf_counter()
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            body = response.read()
            seconds = time.perf_counter() - start
            timing = response.getheader("Server-Timing") or "dur=nan"
            server = float(timing.split("dur=")[1].split(";")[0]) / 1000
            batch = int(timing.split("batch of ")[1].split(")")[0]) if "batch of " in timing else 0
            ok = response.status == 200 and len(json.loads(body)) == k
            out.append((seconds, server, response.status if ok else -response.status, batch))
        except (OSError, http.client.HTTPException, ValueError):
            out.append((time.perf_counter() - start, float("nan"), 0, 0))
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.close()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))] if ordered else float("nan")


def measure(port: int, clients: int, seconds: float, k: int, seed: int) -> dict[str, float]:
    texts = queries(5000, seed)
    client(port, texts[:5], k, time.perf_counter() + 2, [])  # warm-up
    results: list[list[Result]] = [[] for _ in range(clients)]
    until = time.perf_counter() + seconds
    threads = [threading.Thread(target=client, args=(port, texts[c::clients], k, until, results[c]))
               for c in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    rows = [r for rs in results for r in rs]
    lat = [r[0] * 1000 for r in rows if r[2] == 200]
    server = [r[1] * 1000 for r in rows if r[2] == 200]
    return {"requests": len(rows), "errors": sum(1 for r in rows if r[2] != 200), "per_s": len(rows) / elapsed,
            "p50": percentile(lat, 50), "p95": percentile(lat, 95), "p99": percentile(lat, 99),
            "max": max(lat, default=float("nan")), "server_p50": percentile(server, 50),
            "server_p95": percentile(server, 95),
            "batch": sum(r[3] for r in rows if r[2] == 200) / max(1, len(lat))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=None, help="A trained run (default: build a small one).")
    parser.add_argument("--sizes", default="10000,100000", help="Index sizes, comma-separated.")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20.0, help="Load time per index size.")
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="serve --threads (default: serve's own).")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ssb-serve-bench-") as tmp:
        work = Path(tmp)
        run = args.run or build_run(work / "built")
        print(f"# {args.clients} clients x {args.seconds:.0f} s per size, k={args.k}, {os.cpu_count()} CPUs, "
              f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        print("| index rows | requests | errors | requests/s | p50 ms | p95 ms | p99 ms | max ms "
              "| server encode+search p50 ms | p95 ms | mean batch |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for n in (int(s) for s in args.sizes.split(",")):
            build_index(run, n, work / f"index-{n}")
            proc, port = start_server(work / f"index-{n}", args.threads)
            try:
                r = measure(port, args.clients, args.seconds, args.k, n)
            finally:
                proc.terminate()
                proc.wait(timeout=60)
            print(f"| {n:,} | {r['requests']} | {r['errors']} | {r['per_s']:.1f} | {r['p50']:.1f} | {r['p95']:.1f} "
                  f"| {r['p99']:.1f} | {r['max']:.1f} | {r['server_p50']:.1f} | {r['server_p95']:.1f} "
                  f"| {r['batch']:.1f} |",
                  flush=True)
        print(f"# load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
